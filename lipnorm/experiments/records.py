"""Per-step series from a training workdir's JSONL log, read through the run-log contract
(`lipnorm.training.run_log`: its format, its one tolerance rule).

Probe lines carry the keys of `lipnorm.probes.flatten_probes` (per-layer lists and
scalars) and of the Lipschitz hook.
"""
from __future__ import annotations

import math
import pathlib
from typing import Iterable, Optional, Sequence

import numpy as np

from lipnorm.training import run_log


def find_jsonl(workdir: str | pathlib.Path) -> pathlib.Path:
  """The metrics JSONL of a workdir (or the file itself); ValueError if none or several."""
  path = pathlib.Path(workdir)
  if path.is_file():
    return path
  if not path.is_dir():
    raise ValueError(f"workdir {str(path)!r} does not exist")
  files = sorted(path.glob("*.jsonl"))
  if len(files) != 1:
    raise ValueError(f"expected exactly one *.jsonl metrics file in {str(path)!r}, found "
                     f"{[f.name for f in files]}")
  return files[0]


def read_records(workdir: str | pathlib.Path) -> list[dict]:
  """All JSONL records of a workdir (or of a .jsonl file), in file order, as flat dicts
  (`run_log.read_metrics`: a torn last line is skipped with a warning, any other bad
  line raises `run_log.RunLogError`, a ValueError)."""
  return run_log.read_metrics(find_jsonl(workdir))


def _match(record: dict, key: str) -> Optional[object]:
  if key in record:
    return record[key]
  for k, v in record.items():      # tolerate a hook-name prefix, e.g. "probe/eval/..."
    if k.endswith("/" + key):
      return v
  return None


def has_key(records: Iterable[dict], kind: str, key: str) -> bool:
  return any(r.get("kind") == kind and _match(r, key) is not None for r in records)


def first_key(records: Sequence[dict], kind: str, keys: Sequence[str]) -> Optional[str]:
  """The first of `keys` present in some record of `kind`, else None."""
  for key in keys:
    if has_key(records, kind, key):
      return key
  return None


def series(records: Iterable[dict], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps `[T]`, values) of `key` over the records of `kind`, sorted by step; values is
  `[T]` for scalars or `[T, L]` for per-layer lists (NaN where a list is shorter).
  A repeated step keeps its last record (a resumed run rewrites its steps)."""
  by_step: dict[int, object] = {}
  for r in records:
    if r.get("kind") != kind:
      continue
    v = _match(r, key)
    if v is not None:
      by_step[int(r["step"])] = v
  if not by_step:
    raise ValueError(f"no {kind!r} records with key {key!r}")
  steps = np.array(sorted(by_step), np.int64)
  vals = [by_step[s] for s in steps]
  if isinstance(vals[0], (list, tuple)):
    width = max(len(v) for v in vals)
    out = np.full((len(vals), width), np.nan)
    for i, v in enumerate(vals):
      out[i, :len(v)] = [_to_float(a) for a in v]
    return steps, out
  return steps, np.array([_to_float(v) for v in vals], np.float64)


def _to_float(v) -> float:
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan
