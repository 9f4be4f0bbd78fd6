"""Run outputs for humans and programs: the JSONL metrics log (format and reading rules
in `lipnorm.training.run_log`), TensorBoard, progress.

TensorBoard (`<workdir>/tensorboard/`, tensorboardX): every numeric value as the scalar
`<kind>/<key>`; a list value as `<kind>/<key>/<index>`.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

from absl import logging

from lipnorm.training.run_log import (METRICS_FILE, JsonlLog, make_record,  # noqa: F401
                                      read_metrics, to_json_value)

TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
  """Appends records to the JSONL log and TensorBoard; a no-op when `enabled` is False."""

  def __init__(self, workdir: str, enabled: bool, resume_step: Optional[int] = None):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self._log = JsonlLog(workdir, resume_step)
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(f"{workdir}/{TENSORBOARD_DIR}",
                             purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, kind: str, values: dict[str, Any]) -> dict:
    """Writes one record; returns it (as JSON values)."""
    record = make_record(step, kind, values)
    if not self.enabled:
      return record.as_dict()
    self._log.append(record)
    for key, value in record.values.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(f"{kind}/{key}", value, step)
      elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{kind}/{key}/{i}", v, step)
    return record.as_dict()

  def event(self, step: int, event: str, **details: Any) -> dict:
    return self.write(step, "event", {"event": event, **details})

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._log.close()
      self._tb.close()
      self.enabled = False


class Progress:
  """A tqdm bar (rate, ETA) on an interactive terminal, else one log line per window.

  The rate and ETA are averages over this session's steps after its first (compiling)
  one, not over the last window, so the ETA does not jump with evaluation, checkpoint
  and probe pauses. `clock` is for tests.
  """

  def __init__(self, total: int, initial: int, enabled: bool,
               interactive: Optional[bool] = None, clock: Callable[[], float] = time.time):
    self.total = total
    self.enabled = enabled
    self._clock = clock
    self._step = initial
    self._base: Optional[tuple[int, float]] = None   # (step, time) after the first update
    interactive = sys.stderr.isatty() if interactive is None else interactive
    self._bar, self._postfix = None, {}
    if enabled and interactive:
      from tqdm import tqdm
      # smoothing=0: tqdm's rate is the average since the bar started.
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                       file=sys.stderr, smoothing=0)

  def update(self, n: int = 1) -> None:
    self._step += n
    if self._base is None:
      self._base = (self._step, self._clock())
    if self._bar is not None:
      self._bar.update(n)

  def rate(self) -> Optional[float]:
    """Steps per second over this session's steps after its first one (None before)."""
    if self._base is None or self._step <= self._base[0]:
      return None
    elapsed = self._clock() - self._base[1]
    return (self._step - self._base[0]) / elapsed if elapsed > 0 else None

  def eta_s(self) -> Optional[float]:
    rate = self.rate()
    return None if rate is None else (self.total - self._step) / rate

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
    rate, eta = self.rate(), self.eta_s()
    if rate:
      eta = int(eta)
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
