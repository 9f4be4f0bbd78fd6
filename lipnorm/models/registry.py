"""The model registry: `get_model(name, **kwargs)` -> an (unbound) linen module."""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import linen as nn

from lipnorm.models.norm_spec import NormSpec, freeze
from lipnorm.registry import Registry

MODELS: Registry[Any] = Registry("model")
# Config-level keywords `get_model` folds into the model's `norm` field (a NormSpec).
NORM_KWARGS = ("norm", "norm_layers", "norm_options")


def register_model(name: str, cls, **defaults):
  """Registers `cls` (with fixed defaults, e.g. a ResNet depth) under `name`."""
  MODELS.register(name)((cls, defaults))


def model_names() -> list[str]:
  return MODELS.names()


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds model `name`; every model takes `num_classes=`, `norm=` (a normalizer name
  or a `NormSpec`), `norm_layers=` ("all", the first k, or a list of slots) and
  `norm_options=` (a dict for `get_normalizer`). List values become tuples, so the
  model is hashable (a valid `jax.jit` static argument).

  Unknown names or keyword arguments, and impossible shapes or normalizer settings,
  raise a ValueError naming the bad value and what is allowed.

  >>> model = get_model("relu_net", depth=3, width=8, norm="group",
  ...                   norm_options={"num_groups": 2})
  >>> model.norm
  NormSpec(name='group', layers='all', options=(('num_groups', 2),))
  >>> hash(model) == hash(get_model("relu_net", depth=3, width=8, norm="group",
  ...                               norm_options={"num_groups": 2}))
  True
  """
  cls, defaults = MODELS.get(name)
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  allowed = (fields - {"norm"}) | set(NORM_KWARGS)
  unknown = sorted(set(kwargs) - allowed)
  if unknown:
    raise ValueError(f"model {name!r} does not take {unknown}; valid: {sorted(allowed)}")
  kwargs = {**defaults, **kwargs}
  default = next(f.default for f in dataclasses.fields(cls) if f.name == "norm")
  norm = kwargs.pop("norm", default.name)   # the model's default normalizer (by name)
  layers, options = kwargs.pop("norm_layers", None), kwargs.pop("norm_options", None)
  if isinstance(norm, NormSpec):
    if layers is not None or options is not None:
      raise ValueError("pass norm_layers / norm_options inside the NormSpec given as norm=")
  else:
    norm = NormSpec.make(norm, "all" if layers is None else layers, options)
  return cls(norm=norm, **{k: freeze(v) for k, v in kwargs.items()})
