"""The workdir itself (a writable directory) and the resolved config it keeps
(`config.json`, written atomically). metrics.jsonl and summary.json: `run_log`."""
from __future__ import annotations

import json
import os
import tempfile

from flax import traverse_util

from lipnorm.training.config_schema import ConfigError
from lipnorm.training.run_log import SUMMARY_FILE, write_json_atomic  # noqa: F401

CONFIG_FILE = "config.json"
# How a job is launched (differs per process and per launch) or gets its files, not what
# it computes: groups or dotted keys.
_LAUNCH_KEYS = ("distributed", "data.download")


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` if needed and checks it is a writable directory; returns its
  absolute path. ConfigError (one line naming the path) otherwise."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} is not a directory (it is a file); allowed: "
                      f"a new or existing run directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):   # access() is not enough: root, ACLs, ro mounts
      pass
  except OSError as e:
    raise ConfigError(f"--workdir {workdir!r} is not writable ({e.strerror or e}); allowed: "
                      f"a directory this user can create and write") from None
  return workdir


def config_as_dict(config) -> dict:
  """The config as plain JSON values (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _model_defaults_filled(config: dict) -> dict:
  """`config` with each option of its model that it does not list set to the model's
  default (`lipnorm.models.model_options`), as JSON values."""
  from lipnorm.models import model_names, model_options
  model = config.get("model")
  if not isinstance(model, dict) or model.get("name") not in model_names():
    return config
  defaults = json.loads(json.dumps(model_options(model["name"])))
  return {**config, "model": {**defaults, **model}}


def config_differences(old: dict, new: dict) -> list[str]:
  """`key: old -> new` for every computation-relevant field that differs (an unset field,
  null, equals an absent one: configs written before the field existed still match; so
  does a model option left out and one listed with the model's default)."""
  a, b = ({k: v for k, v in traverse_util.flatten_dict(_model_defaults_filled(d),
                                                       sep=".").items()
           if k.split(".")[0] not in _LAUNCH_KEYS and k not in _LAUNCH_KEYS
           and v is not None} for d in (old, new))
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
