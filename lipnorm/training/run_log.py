"""The run-log contract: the one module that reads and writes a workdir's
`metrics.jsonl` and `summary.json`.

`metrics.jsonl` holds one JSON object per line, every line with
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
Accuracy is always the key `ACCURACY` ("accuracy") of train and eval records.
Non-finite floats are written as null (strict JSON). Only process 0 writes.

One tolerance rule for reading: a torn LAST line (a run killed mid-write) is skipped
with a warning; any other line that is not a JSON object with an int "step" and a known
"kind" raises `RunLogError` (a ValueError) naming the file and line.

`summary.json` is the dict `train()` returns (fields in `SUMMARY_FIELDS`), written
atomically.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
KINDS = ("train", "eval", "probe", "event")
ACCURACY = "accuracy"    # the one key of accuracy in train and eval records
_HEADER = ("step", "kind", "time")

# Every key of summary.json (see `lipnorm.training.loop.train` for their meaning).
SUMMARY_FIELDS = (
    "status", "step", "num_train_steps", "diverged_step", "final", "wall_time_s",
    "steps_per_sec", "examples_per_sec", "resumed_from_step", "num_params",
    "process_count", "device_count", "last_checkpoint_step", "probes", "hook_time_s",
    "probe_time_share")

PathLike = Union[str, os.PathLike]


class RunLogError(ValueError):
  """A metrics.jsonl or summary.json that does not follow the contract."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One line of metrics.jsonl: its header and the kind's values (JSON values)."""
  step: int
  kind: str
  time: float
  values: Mapping[str, Any]

  def as_dict(self) -> dict:
    """The record as the flat dict written on its line."""
    return {"step": self.step, "kind": self.kind, "time": self.time, **self.values}

  def get(self, key: str, default: Any = None) -> Any:
    return self.values.get(key, default)


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


def make_record(step: int, kind: str, values: Mapping[str, Any]) -> Record:
  """A record stamped now, its values converted to JSON values."""
  if kind not in KINDS:
    raise ValueError(f"record kind {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
  return Record(int(step), kind, time.time(), to_json_value(dict(values)))


def metrics_path(workdir_or_file: PathLike) -> pathlib.Path:
  """`<workdir>/metrics.jsonl`, or the path itself when it names a .jsonl file."""
  path = pathlib.Path(workdir_or_file)
  return path if path.suffix == ".jsonl" or path.is_file() else path / METRICS_FILE


def _parse(line: str, where: str) -> Record:
  obj = json.loads(line)
  if not isinstance(obj, dict):
    raise RunLogError(f"{where}: not a JSON object")
  step, kind = obj.get("step"), obj.get("kind")
  if isinstance(step, bool) or not isinstance(step, int) or kind not in KINDS:
    raise RunLogError(f"{where}: needs an int 'step' and a 'kind' in {list(KINDS)}, got "
                      f"step={step!r}, kind={kind!r}")
  values = {k: v for k, v in obj.items() if k not in _HEADER}
  return Record(step, kind, float(obj.get("time") or 0.0), values)


def iter_records(workdir_or_file: PathLike) -> Iterator[Record]:
  """The records of a metrics.jsonl in file order (none if the file does not exist),
  under the module's tolerance rule."""
  path = metrics_path(workdir_or_file)
  if not path.exists():
    return
  with open(path) as f:
    lines = f.readlines()
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}: line {lineno}"
    try:
      yield _parse(line, where)
    except json.JSONDecodeError as e:
      if lineno == len(lines) and not line.endswith("\n"):
        logging.warning("%s: skipping a torn last line (a run killed mid-write)", where)
        return
      raise RunLogError(f"{where} is not JSON ({e.msg})") from None


def read_records(workdir_or_file: PathLike) -> list[Record]:
  """All records of a workdir's (or a file's) metrics.jsonl; see `iter_records`."""
  return list(iter_records(workdir_or_file))


def read_metrics(workdir_or_file: PathLike) -> list[dict]:
  """All records as flat dicts (`Record.as_dict`), in file order."""
  return [r.as_dict() for r in iter_records(workdir_or_file)]


def latest_by_kind(records: list[Record]) -> dict[str, Record]:
  """The last record of each kind."""
  return {r.kind: r for r in records}


def latest_probes(records: list[Record]) -> dict[str, dict]:
  """Each probe hook's latest scalar results and their step (the summary's `probes`)."""
  out: dict[str, dict] = {}
  for r in records:
    if r.kind == "probe":
      out[r.values.get("hook", "")] = probe_scalars(r.step, r.values)
  return out


def probe_scalars(step: int, values: Mapping[str, Any]) -> dict:
  """`{"step": step, key: value}` for the scalars of a hook's result (JSON values: numbers,
  or null for a non-finite one)."""
  return {"step": step, **{k: v for k, v in values.items() if k != "hook" and (
      v is None or isinstance(v, (int, float)) and not isinstance(v, bool))}}


class JsonlLog:
  """Appends records to metrics.jsonl (flushed per record). With `resume_step`, first
  drops the records with step > resume_step (written after that checkpoint by an
  interrupted run), so each step appears once."""

  def __init__(self, workdir: PathLike, resume_step: Optional[int] = None):
    self.path = metrics_path(workdir)
    if resume_step is not None and self.path.exists():
      kept = [r for r in iter_records(self.path) if r.step <= resume_step]
      tmp = self.path.with_name(self.path.name + ".tmp")
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r.as_dict()) + "\n" for r in kept)
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")

  def append(self, record: Record) -> None:
    self._file.write(json.dumps(record.as_dict()) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def write_json_atomic(path: PathLike, obj: Any) -> None:
  """Writes JSON to `path` via a temporary file and rename, so readers (and a run killed
  mid-write) see either the old file or the new one."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def write_summary(workdir: PathLike, summary: Mapping[str, Any]) -> None:
  """Writes summary.json atomically; every field of `SUMMARY_FIELDS` must be present."""
  missing = [k for k in SUMMARY_FIELDS if k not in summary]
  if missing:
    raise ValueError(f"summary lacks field(s) {missing}")
  write_json_atomic(pathlib.Path(workdir) / SUMMARY_FILE, to_json_value(dict(summary)))


def read_summary(workdir: PathLike) -> Optional[dict]:
  """A workdir's summary.json, or None when there is none. A file that is not a JSON
  object raises RunLogError."""
  path = pathlib.Path(workdir) / SUMMARY_FILE
  if not path.exists():
    return None
  try:
    obj = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise RunLogError(f"{path} is not JSON ({e.msg})") from None
  if not isinstance(obj, dict):
    raise RunLogError(f"{path} is not a JSON object")
  return obj
