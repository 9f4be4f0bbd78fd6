"""Helpers shared by the model definitions."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import jax
from flax import linen as nn

from lipnorm.models import structure as st
from lipnorm.models.conv import Conv, check_conv_impl
from lipnorm.normalizers import get_normalizer

NormLayers = Union[str, int, Sequence[int]]


def normalized_indices(norm_layers: NormLayers, num_layers: int) -> frozenset[int]:
  """Which of `num_layers` candidate positions (0-based) carry a normalizer.

  `"all"` -> every position; an int k -> the first k; a sequence -> exactly those.
  ValueError names the bad value and what is allowed.
  """
  if isinstance(norm_layers, str):
    if norm_layers != "all":
      raise ValueError(
          f"norm_layers={norm_layers!r}; allowed: 'all', an int k in [0, {num_layers}], "
          f"or a list of layer indices in [0, {num_layers - 1}]")
    return frozenset(range(num_layers))
  if isinstance(norm_layers, bool):
    raise ValueError(f"norm_layers={norm_layers!r} must be 'all', an int or a list")
  if isinstance(norm_layers, int):
    if not 0 <= norm_layers <= num_layers:
      raise ValueError(
          f"norm_layers={norm_layers} (first k normalized) must be in [0, {num_layers}]")
    return frozenset(range(norm_layers))
  idx = [int(i) for i in norm_layers]
  bad = [i for i in idx if not 0 <= i < num_layers]
  if bad or len(set(idx)) != len(idx):
    raise ValueError(
        f"norm_layers={list(norm_layers)}: indices must be distinct and in "
        f"[0, {num_layers - 1}]")
  return frozenset(idx)


def norm_epsilon(norm_options: Optional[dict]) -> float:
  """The epsilon a normalizer built with these options uses (the layers' default 1e-5)."""
  return (norm_options or {}).get("epsilon", 1e-5)


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
  use_running_average: bool
  use_bias: bool
  kernel_init: Any
  dtype: Any
  conv_impl: str = "auto"   # lipnorm.models.conv.CONV_IMPLS

  def __post_init__(self):
    check_conv_impl(self.conv_impl)


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
    h = ctx.norm_factory(name=spec.norm_name)(h, use_running_average=ctx.use_running_average)
  return h


def conv_norm_structure(spec: ConvSpec, prefix: tuple[str, ...], normalized: frozenset,
                        norm: str, epsilon: float) -> st.Sequential:
  """Structure nodes of `conv_norm(spec, ...)` applied in the module at path `prefix`."""
  return st.seq(
      st.Linear(prefix + (spec.name,), "conv", spec.strides, spec.padding,
                spec.feature_group_count),
      st.Norm(prefix + (spec.norm_name,), norm, epsilon) if spec.slot in normalized else None)


def normalized_slots(norm: str, norm_layers: NormLayers, num_slots: int,
                     norm_options: Optional[dict]) -> frozenset[int]:
  """The normalized slots of a model with `num_slots` candidate positions; validates the
  normalizer name and options first (ValueError listing the valid ones)."""
  get_normalizer(norm, **(norm_options or {}))
  if norm == "none":
    return frozenset()
  return normalized_indices(norm_layers, num_slots)
