"""What a run keeps in its workdir besides checkpoints and metrics: the resolved config
(`config.json`) and the final summary (`summary.json`), both written atomically."""
from __future__ import annotations

import json
import os
from typing import Any

from flax import traverse_util

from lipnorm.training.config_schema import ConfigError

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
# How a job is launched (differs per process and per launch) or gets its files, not what
# it computes: groups or dotted keys.
_LAUNCH_KEYS = ("distributed", "data.download")


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to `path` via a temporary file and rename, so readers (and a run killed
  mid-write) see either the old file or the new one."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def config_as_dict(config) -> dict:
  """The config as plain JSON values (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def config_differences(old: dict, new: dict) -> list[str]:
  """`key: old -> new` for every computation-relevant field that differs."""
  a, b = ({k: v for k, v in traverse_util.flatten_dict(d, sep=".").items()
           if k.split(".")[0] not in _LAUNCH_KEYS and k not in _LAUNCH_KEYS}
          for d in (old, new))
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def check_config(workdir: str, config, override: bool) -> list[str]:
  """Compares `config` with the one stored in `workdir` (if any).

  Returns the differences (empty for a new or matching workdir). Raises ConfigError when
  they differ and `override` is False, so a run never silently continues another one.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    old = json.load(f)
  diffs = config_differences(old, config_as_dict(config))
  if diffs and not override:
    shown = "; ".join(diffs[:5]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 5 else "")
    raise ConfigError(
        f"workdir {workdir!r} holds a different config ({shown}); use a new workdir, or "
        f"pass --override_config to reuse it (resuming its checkpoint where compatible)")
  return diffs
