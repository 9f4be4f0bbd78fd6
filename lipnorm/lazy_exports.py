"""Lazy package exports (PEP 562): a package's public names are imported from their
submodules on first use, so that importing a light submodule (e.g. the config schema,
which `train.py` needs to reject a bad flag) does not import JAX, Flax and Orbax first."""
from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
  """(`__getattr__`, `__dir__`) for `package`: `exports` maps each public name to a
  submodule (relative to `package`) that provides it. Submodules not yet imported are
  reachable as attributes too, as with eager imports."""
  def __getattr__(name: str) -> object:
    if name in exports:
      value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
    else:
      try:
        value = importlib.import_module(f"{package}.{name}")
      except ModuleNotFoundError as e:
        if e.name != f"{package}.{name}":
          raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    globals_ = importlib.import_module(package).__dict__
    globals_[name] = value        # later lookups skip __getattr__
    return value

  def __dir__() -> list[str]:
    return sorted(set(importlib.import_module(package).__dict__) | set(exports))

  return __getattr__, __dir__
