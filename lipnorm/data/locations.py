"""Where local dataset files are looked for.

Order, for a dataset `<name>` (e.g. "cifar10"):
  1. `data_dir` when the config gives one: the folder itself, then `data_dir/<name>`;
  2. otherwise `$LIPNORM_DATA_DIR/<name>` (when that variable is set), then
     `~/.cache/lipnorm/<name>`.
lipnorm writes there only when asked to download (`python -m lipnorm.data download
<name>` or `data.download=True`): into `download_dir(name, data_dir)`, one of these folders.
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional, Sequence

ENV_VAR = "LIPNORM_DATA_DIR"


def default_cache_root() -> pathlib.Path:
  return pathlib.Path("~/.cache/lipnorm").expanduser()


def candidate_dirs(name: str, data_dir: Optional[str]) -> list[pathlib.Path]:
  """Folders searched for dataset `name`, in order (existing or not)."""
  if data_dir:
    root = pathlib.Path(data_dir).expanduser()
    return [root, root / name]
  dirs = []
  env = os.environ.get(ENV_VAR)
  if env:
    dirs.append(pathlib.Path(env).expanduser() / name)
  dirs.append(default_cache_root() / name)
  return dirs


def download_dir(name: str, data_dir: Optional[str]) -> pathlib.Path:
  """Where a download of `name` goes: `data_dir/<name>` when a data_dir is given, else the
  first default folder (`$LIPNORM_DATA_DIR/<name>` or `~/.cache/lipnorm/<name>`)."""
  return candidate_dirs(name, data_dir)[-1 if data_dir else 0]


def not_found_error(name: str, looked: Sequence[pathlib.Path], wanted: str,
                    how_to_get: str) -> ValueError:
  """The ValueError for a dataset that is not available offline."""
  from lipnorm.data.download import DOWNLOADS  # lazy: download imports this module
  places = "\n".join(f"  - {p}" for p in looked)
  fetch = (f"\nOr download it: python -m lipnorm.data download {name} [--data_dir DIR] "
           f"(in a training config: data.download=True)." if name in DOWNLOADS else "")
  return ValueError(
      f"dataset {name!r} not found offline: looked for {wanted} in\n{places}\n"
      f"{how_to_get}\nThen pass its folder as data_dir (or set ${ENV_VAR} to the folder "
      f"that holds {name}/).{fetch}")
