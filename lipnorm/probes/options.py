"""The `config.probes` fields, their defaults and their checks (no JAX import: the
training config schema builds its defaults from here)."""
from __future__ import annotations

from typing import Any, Mapping

from lipnorm.bn_modes import BATCH, EVAL, FORWARD_BN_MODES, LIPSCHITZ_BN_MODES

PROBE_OPTIONS: dict[str, Any] = {
    "enabled": False,
    "every_steps": 100,             # layer statistics: one forward pass + weight op norms
    "lipschitz_every_steps": 1000,  # Lipschitz constants, bounds, Hessian eigenvalue
    "batch_size": 256,              # the fixed probe batch (first train examples)
    "bn_modes": (EVAL, BATCH),      # layer statistics in these FORWARD_BN_MODES (lipnorm.bn_modes)
    "spectral_every_steps": 500,    # exact weight operator norms at layer probes of steps
                                    # divisible by this and at the last step (SVDs / conv
                                    # power iterations; 0: never)
    "lipschitz": True,              # run the Lipschitz hook at all
    "lipschitz_examples": 8,        # examples of the probe batch for local Lipschitz constants
    "lipschitz_bn_modes": (EVAL,),  # LIPSCHITZ_BN_MODES; add "batch_fixed" for training mode
    "param_lipschitz": True,        # also ||J_theta f||_2
    "bound": True,                  # also the engine's upper bound
    "hessian_examples": 128,        # examples for the loss Hessian's top eigenvalue (0: off)
    "chain_max_dim": 4096,          # certified chain bound only for maps of at most this many
                                    # inputs/outputs (0: never; the folded bound is then
                                    # lip_bound_certified). lipnorm.lipschitz.certified's
                                    # DEFAULT_CHAIN_MAX_DIM; cost ~ width^3 per probe
}


def _subset(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if isinstance(value, str) or not value or any(v not in allowed for v in value):
    raise ValueError(f"config.probes.{name}={value!r} is not allowed; allowed: a non-empty "
                     f"list of {', '.join(allowed)}")


def _int(name: str, value: Any, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"config.probes.{name}={value!r} is not allowed; allowed: an integer "
                     f">= {low}")


def _bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"config.probes.{name}={value!r} is not allowed; allowed: True, False")


def validate_probe_options(probes: Mapping[str, Any]) -> None:
  """ValueError naming the first bad `config.probes` field (unknown keys included)."""
  unknown = sorted(set(probes) - set(PROBE_OPTIONS))
  if unknown:
    raise ValueError(f"unknown config.probes field(s) {unknown}; valid: {sorted(PROBE_OPTIONS)}")
  get = lambda k: probes[k] if k in probes else PROBE_OPTIONS[k]  # noqa: E731
  for name in ("enabled", "lipschitz", "param_lipschitz", "bound"):
    _bool(name, get(name))
  for name in ("every_steps", "lipschitz_every_steps", "batch_size", "lipschitz_examples"):
    _int(name, get(name), 1)
  _int("hessian_examples", get("hessian_examples"), 0)
  _int("chain_max_dim", get("chain_max_dim"), 0)
  _int("spectral_every_steps", get("spectral_every_steps"), 0)
  _subset("bn_modes", get("bn_modes"), FORWARD_BN_MODES)
  _subset("lipschitz_bn_modes", get("lipschitz_bn_modes"), LIPSCHITZ_BN_MODES)
