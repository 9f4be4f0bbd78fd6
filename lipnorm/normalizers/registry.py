"""The normalizer registry: `get_normalizer(name, **options)` -> a linen module factory.

The factory is called like a module class, e.g. `get_normalizer("group", num_groups=8)
(name="norm_0")`, and the module is applied as `norm(x, use_running_average=...)`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

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

# Options a user may set per normalizer (the rest of the dataclass fields are internal).
_OPTIONS = {
    "none": (),
    "batch": ("epsilon", "momentum", "axis_name", "use_scale", "use_bias", "scale_init",
              "bias_init", "param_dtype"),
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

  Options (where meaningful): epsilon, momentum (BN), axis_name (BN: sync statistics
  over that pmap axis), num_groups or group_size (GN), use_scale, use_bias.
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


def factory_kind(factory: NormFactory) -> str:
  """The registry name a factory builds (reads the module's `kind` field)."""
  cls = factory.func if isinstance(factory, functools.partial) else factory
  kw = factory.keywords if isinstance(factory, functools.partial) else {}
  if "kind" in kw:
    return kw["kind"]
  return {f.name: f.default for f in dataclasses.fields(cls)}["kind"]
