"""The normalizer registry: `get_normalizer(name, **options)` -> a linen module factory.

The factory is called like a module class, e.g. `get_normalizer("group", num_groups=8)
(name="norm_0")`, and the module is applied as `norm(x, use_batch_stats=...)` (see
`lipnorm.bn_modes`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from flax import linen as nn

from lipnorm.normalizers import layers
from lipnorm.registry import Registry

NormFactory = Callable[..., nn.Module]

_NORMALIZERS: Registry[tuple[type, dict]] = Registry("normalizer")
_NORMALIZERS.register("none")((layers.Identity, {}))
_NORMALIZERS.register("batch")((layers.BatchNorm, {}))
_NORMALIZERS.register("layer")((layers.GroupNorm, {"num_groups": 1, "kind": "layer"}))
_NORMALIZERS.register("group")((layers.GroupNorm, {"kind": "group"}))
_NORMALIZERS.register("instance")((layers.GroupNorm, {"group_size": 1, "kind": "instance"}))
_NORMALIZERS.register("rms")((layers.RMSNorm, {}))

# Options a user may set per normalizer (the rest of the dataclass fields are internal;
# BatchNorm's `axis_name` is set by the model from its `bn_axis_name` argument, which
# only training passes).
_OPTIONS = {
    "none": (),
    "batch": ("epsilon", "momentum", "use_scale", "use_bias", "scale_init", "bias_init",
              "param_dtype"),
    "layer": ("epsilon", "use_scale", "use_bias", "scale_init", "bias_init", "param_dtype"),
    "group": ("num_groups", "group_size", "epsilon", "use_scale", "use_bias", "scale_init",
              "bias_init", "param_dtype"),
    "instance": ("epsilon", "use_scale", "use_bias", "scale_init", "bias_init",
                 "param_dtype"),
    "rms": ("epsilon", "use_scale", "use_bias", "scale_init", "bias_init", "param_dtype"),
}


def normalizer_names() -> list[str]:
  return _NORMALIZERS.names()


def get_normalizer(name: str, **options: Any) -> NormFactory:
  """Returns a factory for the normalizer `name` with the given options.

  Options (where meaningful): epsilon, momentum (BN), num_groups or group_size (GN),
  use_scale, use_bias.
  Raises ValueError for an unknown name, an option the normalizer does not take, or
  an impossible value.
  """
  cls, fixed = _NORMALIZERS.get(name)
  allowed = _OPTIONS[name]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(
        f"normalizer {name!r} does not take option(s) {unknown}; "
        f"allowed: {list(allowed) or 'none'}")
  eps = options.get("epsilon", 1e-5)
  if not eps > 0:
    raise ValueError(f"normalizer epsilon={eps!r} must be > 0")
  if "momentum" in options and not 0.0 <= options["momentum"] < 1.0:
    raise ValueError(f"BatchNorm momentum={options['momentum']!r} must be in [0, 1)")
  for key in ("num_groups", "group_size"):
    v = options.get(key)
    if v is not None and (not isinstance(v, int) or v < 1):
      raise ValueError(f"GroupNorm {key}={v!r} must be a positive integer")
  if options.get("num_groups") is not None and options.get("group_size") is not None:
    raise ValueError("GroupNorm takes num_groups or group_size, not both")
  return functools.partial(cls, **fixed, **options)


def is_normalizer(module: nn.Module) -> bool:
  """True for modules built by this registry (including the `none` Identity)."""
  return isinstance(module, (layers.Identity, layers.BatchNorm, layers.GroupNorm,
                             layers.RMSNorm))


def channel_groups(name: str, channels: int, **options: Any) -> Optional[int]:
  """Per-sample groups the normalizer `name` normalizes over `channels` channels (1 for
  layer, `channels` for instance), or None for normalizers without per-sample groups
  (none, batch, rms). ValueError (listing the allowed values) when GN's `num_groups` /
  `group_size` does not divide `channels`."""
  cls, fixed = _NORMALIZERS.get(name)
  if cls is not layers.GroupNorm:
    return None
  merged = {**fixed, **options}
  return layers.resolve_num_groups(channels, merged.get("num_groups"),
                                   merged.get("group_size"))
