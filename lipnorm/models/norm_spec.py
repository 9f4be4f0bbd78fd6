"""`NormSpec`: which normalizer a model uses, on which layers, with which options.

Every zoo model holds one as its `norm` field. It is frozen and hashable (options are a
sorted tuple of pairs, layer lists a tuple), so a model is a valid `jax.jit` static
argument. `get_model(name, norm="group", norm_layers=..., norm_options={...})` builds it
from the config-level keywords.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence, Union

from lipnorm.normalizers import channel_groups, check_not_degenerate, get_normalizer
from lipnorm.normalizers.registry import NormFactory

NormLayers = Union[str, int, Sequence[int]]
DEFAULT_EPSILON = 1e-5   # the normalizer layers' default


def freeze(value: Any) -> Any:
  """Lists (and nested lists) as tuples, so the value hashes."""
  if isinstance(value, (list, tuple)):
    return tuple(freeze(v) for v in value)
  return value


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


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """A model's normalizer: registry `name`, the normalized `layers` ("all", the first k,
  or a tuple of slot indices) and `options` for `get_normalizer` as sorted
  `(key, value)` pairs. Build it with `NormSpec.make`, which validates.

  >>> spec = NormSpec.make("group", layers=[0, 2], options={"num_groups": 4})
  >>> spec
  NormSpec(name='group', layers=(0, 2), options=(('num_groups', 4),))
  >>> spec.slots(4), spec.epsilon
  (frozenset({0, 2}), 1e-05)
  >>> hash(spec) == hash(NormSpec.make("group", (0, 2), {"num_groups": 4}))
  True
  """
  name: str = "none"
  layers: NormLayers = "all"
  options: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def make(cls, name: Union[str, "NormSpec"] = "none", layers: NormLayers = "all",
           options: Optional[Mapping[str, Any]] = None) -> "NormSpec":
    """A validated spec (ValueError for an unknown normalizer, option or value); a
    `NormSpec` passed as `name` is returned as it is."""
    if isinstance(name, NormSpec):
      return name
    options = dict(options or {})
    get_normalizer(name, **options)
    return cls(name, freeze(layers), tuple(sorted((k, freeze(v)) for k, v in options.items())))

  @property
  def option_dict(self) -> dict[str, Any]:
    return dict(self.options)

  @property
  def epsilon(self) -> float:
    """The epsilon its layers use."""
    return self.option_dict.get("epsilon", DEFAULT_EPSILON)

  def factory(self, bn_axis_name: Optional[str] = None) -> NormFactory:
    """`get_normalizer(name, **options)`; BatchNorm also gets `axis_name=bn_axis_name`
    (its batch statistics are then those of the global batch under pmap)."""
    factory = get_normalizer(self.name, **self.option_dict)
    if self.name == "batch" and bn_axis_name is not None:
      return functools.partial(factory, axis_name=bn_axis_name)
    return factory

  def slots(self, num_slots: int) -> frozenset[int]:
    """The normalized slots of a model with `num_slots` candidate positions (none for
    `name="none"`)."""
    if self.name == "none":
      return frozenset()
    return normalized_indices(self.layers, num_slots)

  def check_channels(self, channels: int, *, spatial: bool) -> None:
    """ValueError when a normalized layer of `channels` features cannot work: GN groups
    that do not divide `channels`, or (for a dense layer, `spatial=False`) per-sample
    groups of a single feature, which make the network constant."""
    groups = channel_groups(self.name, channels, **self.option_dict)
    if groups is not None and not spatial:
      check_not_degenerate(self.name, channels // groups, channels, groups)


def coerce_norm(module: Any) -> None:
  """Lets a model built directly take `norm="batch"` (a registry name): replaces it by
  `NormSpec.make(name)` (call first in the model's `__post_init__`)."""
  if not isinstance(module.norm, NormSpec):
    object.__setattr__(module, "norm", NormSpec.make(module.norm))
