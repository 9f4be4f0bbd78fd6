"""Helpers shared by the model definitions."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Sequence, Union

import jax
from flax import linen as nn

from lipnorm.models import structure as st
from lipnorm.models.conv import Conv, check_conv_impl
from lipnorm.models.norm_spec import NormSpec, coerce_norm


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One convolution that may carry a normalizer (a "normalizer slot").

  `name` / `norm_name` are the submodule names inside the module that applies it;
  `slot` is the conv's 0-based position among all normalizer slots of the model, in
  forward order, which is what a model's `norm_layers` indexes.
  """
  name: str
  norm_name: str
  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int]
  padding: Union[str, tuple]
  slot: int
  feature_group_count: int = 1


@dataclasses.dataclass(frozen=True)
class ConvNormContext:
  """What every `conv_norm` call of one forward pass shares."""
  normalized: frozenset
  norm_factory: Callable[..., nn.Module]
  use_batch_stats: bool
  use_bias: bool
  kernel_init: Any
  dtype: Any
  conv_impl: str = "auto"   # lipnorm.models.conv.CONV_IMPLS

  def __post_init__(self):
    check_conv_impl(self.conv_impl)


def check_conv_model(module: nn.Module, plan: Callable[[], Any]) -> None:
  """The construction-time checks of every conv model (call from `__post_init__`), so a
  bad setting fails before any work: a registry name given as `norm` becomes a
  `NormSpec`, `conv_impl` is a valid name, and `module._normalized(plan())` validates the
  normalized slots against the model's conv plan."""
  coerce_norm(module)
  check_conv_impl(module.conv_impl)
  module._normalized(plan())


def conv_norm(spec: ConvSpec, h: jax.Array, ctx: ConvNormContext) -> jax.Array:
  """`spec`'s conv, then its normalizer when its slot is normalized (the conv then has
  no bias: the normalizer's mean removes it). Call from inside a compact method; the
  submodules are created in that module's scope."""
  has_norm = spec.slot in ctx.normalized
  h = Conv(spec.features, spec.kernel, strides=spec.strides, padding=spec.padding,
           feature_group_count=spec.feature_group_count,
           use_bias=ctx.use_bias and not has_norm, kernel_init=ctx.kernel_init,
           dtype=ctx.dtype, conv_impl=ctx.conv_impl, name=spec.name)(h)
  if has_norm:
    h = ctx.norm_factory(name=spec.norm_name)(h, use_batch_stats=ctx.use_batch_stats)
  return h


def conv_norm_structure(spec: ConvSpec, prefix: tuple[str, ...], normalized: frozenset,
                        norm: str, epsilon: float) -> st.Sequential:
  """Structure nodes of `conv_norm(spec, ...)` applied in the module at path `prefix`."""
  return st.seq(
      st.Linear(prefix + (spec.name,), "conv", spec.strides, spec.padding,
                spec.feature_group_count),
      st.Norm(prefix + (spec.norm_name,), norm, epsilon) if spec.slot in normalized else None)


def normalized_conv_slots(norm: NormSpec, specs: Sequence[ConvSpec]) -> frozenset[int]:
  """The normalized slots among `specs` (all of a model's convs, one slot each); checks
  that each normalized conv's channel count suits the normalizer (GN groups dividing
  it). ValueError otherwise."""
  normalized = norm.slots(len(specs))
  for spec in specs:
    if spec.slot in normalized:
      norm.check_channels(spec.features, spatial=True)
  return normalized


def is_positive_int(value: Any) -> bool:
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and value >= 1)


def check_positive(model: str, **values: int) -> None:
  """ValueError naming the first field that is not a positive integer."""
  for field, value in values.items():
    if not is_positive_int(value):
      raise ValueError(f"{model} {field}={value!r} must be a positive integer")
