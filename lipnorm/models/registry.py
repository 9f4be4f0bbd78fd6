"""The model registry: `get_model(name, **kwargs)` -> an (unbound) linen module."""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import linen as nn

from lipnorm.registry import Registry

MODELS: Registry[Any] = Registry("model")


def register_model(name: str, cls, **defaults):
  """Registers `cls` (with fixed defaults, e.g. a ResNet depth) under `name`."""
  MODELS.register(name)((cls, defaults))


def model_names() -> list[str]:
  return MODELS.names()


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds model `name`; every model takes `num_classes=` and `norm=`.

  Unknown names or keyword arguments raise a ValueError that lists the valid ones.
  """
  cls, defaults = MODELS.get(name)
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"model {name!r} does not take {unknown}; valid: {sorted(fields)}")
  return cls(**{**defaults, **kwargs})
