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


def _plain_value(value: Any) -> bool:
  """A value a config field (and a command-line override) can hold: a bool, int, float
  or str, or a flat tuple of those."""
  if isinstance(value, (bool, int, float, str)):
    return True
  return isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value)


# Fields a run sets from elsewhere (the dataset, `config.dtype`, the training loop), and
# the normalizer (config files spell it `norm`, `norm_layers`, `norm_options`).
_NOT_OPTIONS = frozenset({"num_classes", "dtype", "bn_axis_name", "norm"})


def model_options(name: str) -> dict[str, Any]:
  """The keyword arguments of `get_model(name, ...)` that have plain defaults (bool, int,
  float, str or a flat tuple of them), with the defaults `get_model` uses, plus
  `norm_layers="all"`. Config files list them so that each can be set from the command
  line (`--config.model.width=16`); the model built is the same as without them.

  >>> model_options("relu_net")
  {'depth': 10, 'width': 512, 'activation': 'relu', 'use_bias': True, 'norm_layers': 'all'}
  """
  cls, defaults = MODELS.get(name)
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in _NOT_OPTIONS or f.name in ("parent", "name"):
      continue
    value = defaults.get(f.name, f.default)
    if _plain_value(value):
      out[f.name] = value
  out["norm_layers"] = "all"
  return out


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
