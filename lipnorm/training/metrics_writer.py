"""Run outputs for humans and programs: the JSONL metrics log, TensorBoard, progress.

JSONL format (`<workdir>/metrics.jsonl`), one JSON object per line, every line with
  "step": int  optimizer updates completed when the record was made,
  "kind": "train" | "eval" | "probe" | "event",
  "time": float  Unix time of writing,
and then, per kind:
  train: loss, accuracy, grad_norm (means over the logging window), learning_rate (of
         the last update), window_steps, steps_per_sec and examples_per_sec (wall-clock
         rate over the window, evaluation and checkpoint time included, a session's
         first, compiling, step excluded; null when the window has no other step).
  eval:  split, loss, accuracy, num_examples (eval-mode BN, padding excluded).
  probe: hook (its name) and whatever the hook returned: floats or lists of floats.
  event: event ("start", "resumed", "checkpoint", "config_override", "diverged",
         "preempted", "completed") and details (e.g. "nonfinite": ["loss"]).
Non-finite floats are written as null (strict JSON). When a run resumes from step s,
records with step > s (written after that checkpoint by the interrupted run) are
dropped, so each step appears once. Only process 0 writes.

TensorBoard (`<workdir>/tensorboard/`, tensorboardX): every numeric value as the scalar
`<kind>/<key>`; a list value as `<kind>/<key>/<index>`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def to_json_value(value: Any) -> Any:
  """numpy / JAX scalars and arrays -> Python numbers and lists; non-finite -> None."""
  if isinstance(value, (str, bool)) or value is None:
    return value
  if isinstance(value, dict):
    return {k: to_json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_value(v) for v in value]
  arr = np.asarray(value)
  if arr.ndim:
    return [to_json_value(v) for v in arr.tolist()]
  item = arr.item()
  if isinstance(item, float) and not math.isfinite(item):
    return None
  return item


def read_metrics(path: str) -> list[dict]:
  """Parses a metrics.jsonl file, skipping a torn last line (a run killed mid-write)."""
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


class MetricsWriter:
  """Appends records to the JSONL log and TensorBoard; a no-op when `enabled` is False."""

  def __init__(self, workdir: str, enabled: bool, resume_step: Optional[int] = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    if resume_step is not None and os.path.exists(self.path):
      kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp, self.path)
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                             purge_step=None if resume_step is None else resume_step + 1)
    self._file = open(self.path, "a")

  def write(self, step: int, kind: str, values: dict[str, Any]) -> dict:
    """Writes one record; returns it (as JSON values)."""
    record = {"step": int(step), "kind": kind, "time": time.time(), **to_json_value(values)}
    if not self.enabled:
      return record
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for key, value in record.items():
      if key in ("step", "kind", "time"):
        continue
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(f"{kind}/{key}", value, step)
      elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{kind}/{key}/{i}", v, step)
    return record

  def event(self, step: int, event: str, **details: Any) -> dict:
    return self.write(step, "event", {"event": event, **details})

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()
      self.enabled = False


class Progress:
  """A tqdm bar (rate, ETA) on an interactive terminal, else one log line per window."""

  def __init__(self, total: int, initial: int, enabled: bool,
               interactive: Optional[bool] = None):
    self.total = total
    self.enabled = enabled
    interactive = sys.stderr.isatty() if interactive is None else interactive
    self._bar, self._postfix = None, {}
    if enabled and interactive:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                       file=sys.stderr)

  def update(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def report(self, record: dict) -> None:
    """Shows a train or eval record: bar postfix, or a plain log line with rate and ETA."""
    if not self.enabled:
      return
    fields = {k: record[k] for k in ("loss", "accuracy") if record.get(k) is not None}
    if self._bar is not None:
      self._postfix.update({f"{record['kind']}_{k}": f"{v:.4g}" for k, v in fields.items()})
      self._bar.set_postfix(self._postfix)
      return
    line = f"{record['kind']} step {record['step']}/{self.total}: " + ", ".join(
        f"{k} {v:.4g}" for k, v in fields.items())
    rate = record.get("steps_per_sec")
    if rate:
      eta = int((self.total - record["step"]) / rate)
      line += f" | {rate:.3g} steps/s, ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
    logging.info(line)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class _DropChattyLibraries:
  """A logging filter dropping INFO-and-below records from Orbax (several per save) and
  JAX (backend probing)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(
        part in record.pathname for part in ("/orbax/", "/jax/_src/"))


def quiet_library_logs() -> None:
  """Keeps absl's log stream to lipnorm's own lines (warnings from libraries still show)."""
  logging.get_absl_handler().addFilter(_DropChattyLibraries())
