"""Training-loop hooks that record probes (used by `lipnorm.training.hooks.build_hooks`).

A hook has `every: int` and `__call__(step, variables, probe_batch) -> dict[str, float |
list]`; the training loop calls it when `step % every == 0` and writes the result as a
JSONL record of kind "probe" (and to TensorBoard). Hooks only read `variables`: they
never touch the optimizer state, the data order or any PRNG key of training, so a run
with probes on ends with the same parameters as one with probes off.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lipnorm.lipschitz.certified import DEFAULT_CHAIN_MAX_DIM
from lipnorm.probes.lipschitz_metrics import has_batchnorm, hessian_top, lipschitz_metrics
from lipnorm.probes.options import PROBE_OPTIONS
from lipnorm.probes.prober import LayerProber, flatten_probes


def measurement_model(model: nn.Module) -> nn.Module:
  """The module that probes and experiments measure for a training `model`: the same
  function of the same variables, without the pmap axis (`bn_axis_name`: measurements
  run on the host, outside pmap) and computing in float32. A bfloat16 training model
  keeps float32 parameters; measuring it in bfloat16 would give Jacobians with about 3
  significant digits, power and Lanczos iterations that cannot reach their tolerance,
  and `eigh` has no bfloat16 kernel. So a mixed-precision run is measured as the
  float32 network its parameters define."""
  changes = {}
  if getattr(model, "bn_axis_name", None) is not None:
    changes["bn_axis_name"] = None
  if jnp.dtype(getattr(model, "dtype", None) or jnp.float32) != jnp.float32:
    changes["dtype"] = jnp.float32
  return model.clone(**changes) if changes else model


def probe_inputs(probe_batch: Any) -> jax.Array:
  """The images of a probe batch (`{"image": [N, ...], "label": [N]}` or an array)."""
  if isinstance(probe_batch, Mapping):
    return jnp.asarray(probe_batch["image"])
  return jnp.asarray(probe_batch)


class LayerProbeHook:
  """Per-layer statistics (`LayerProber`) every `every` steps, flattened to lists; the
  exact weight operator norms (`weight_spectral*` keys) only at steps divisible by
  `spectral_every` and at `last_step` (the run's final probe, so that every series ends
  at the trained net), as they cost SVDs / power iterations (`spectral_every=0`: never)."""

  def __init__(self, model: nn.Module, every: int, *, bn_modes: Sequence[str] = ("eval",),
               spectral_every: int = 1, last_step: Optional[int] = None):
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"LayerProbeHook every={every!r} must be a positive integer")
    if not isinstance(spectral_every, int) or spectral_every < 0:
      raise ValueError(f"LayerProbeHook spectral_every={spectral_every!r} must be an "
                       "integer >= 0")
    self.every, self.spectral_every, self.last_step = every, spectral_every, last_step
    self.prober = LayerProber(model, bn_modes=bn_modes, spectral=False)

  def __call__(self, step: int, variables: Any, probe_batch: Any) -> dict:
    spectral = self.spectral_every > 0 and (step % self.spectral_every == 0
                                            or step == self.last_step)
    return flatten_probes(self.prober(variables, probe_inputs(probe_batch),
                                      spectral=spectral))


class LipschitzHook:
  """Every `every` steps, on the first `num_examples` of the probe batch:
  `<mode>/lip_x_{max,mean}`, `<mode>/lip_theta_{max,mean}`, `<mode>/bound`,
  `<mode>/product_bound` (see `lipschitz_metrics.bounds`) for each BN
  mode in `bn_modes` (only "eval" for models without BN), and `hessian_top` (top Hessian
  eigenvalue of the cross-entropy on the first `hessian_examples` probe examples, BN on
  batch statistics; Lanczos, 20 iterations) and `hessian_converged` when
  `hessian_examples > 0`. `chain_max_dim`: see `lipschitz_metrics.bounds`.

  Cost: the jitted measurements compile at the first call (seconds: the Hessian's
  Lanczos loop most) and are reused at every later call (keyed on the hashable model
  and the shapes); later calls pay the computation itself, the bound's float64 linear
  algebra included."""

  def __init__(self, model: nn.Module, every: int, *, num_classes: int,
               bn_modes: Sequence[str] = ("eval", "batch_fixed"), num_examples: int = 32,
               param: bool = True, bound: bool = True, hessian_examples: int = 128,
               chain_max_dim: int = DEFAULT_CHAIN_MAX_DIM):
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"LipschitzHook every={every!r} must be a positive integer")
    if num_examples < 1 or hessian_examples < 0:
      raise ValueError(f"LipschitzHook num_examples={num_examples!r} must be >= 1 and "
                       f"hessian_examples={hessian_examples!r} >= 0")
    self.every, self.model, self.num_classes = every, model, num_classes
    self.bn_modes = tuple(bn_modes) if has_batchnorm(model) else ("eval",)
    self.num_examples, self.param, self.bound = num_examples, param, bound
    self.hessian_examples, self.chain_max_dim = hessian_examples, chain_max_dim

  def __call__(self, step: int, variables: Any, probe_batch: Any) -> dict:
    del step
    xs = probe_inputs(probe_batch)[:self.num_examples]
    out: dict[str, float] = {}
    for mode in self.bn_modes:
      m = lipschitz_metrics(self.model, variables, xs, bn_mode=mode, param=self.param,
                            bound=self.bound, chain_max_dim=self.chain_max_dim)
      out.update({f"{mode}/{k}": v for k, v in m.items()})
    if self.hessian_examples and isinstance(probe_batch, Mapping):
      n = self.hessian_examples
      top, converged = hessian_top(
          self.model, variables, {"image": probe_batch["image"][:n],
                                  "label": probe_batch["label"][:n]}, self.num_classes)
      out["hessian_top"], out["hessian_converged"] = top, float(converged)
    return out


def probe_option(config: Any, key: str) -> Any:
  """`config.probes.<key>`, or its default from `PROBE_OPTIONS`."""
  probes = getattr(config, "probes", None)
  if probes is not None and key in probes:
    return probes[key]
  return PROBE_OPTIONS[key]


def probe_hook_fns(config: Any, model: nn.Module, num_classes: int,
                   last_step: Optional[int] = None
                   ) -> list[tuple[str, int, Callable[[int, Any, Any], dict]]]:
  """(name, every, fn) of the hooks `config.probes` asks for (none when disabled).
  `model` may be the training model (BN synced over the pmap axis `bn_axis_name`, or
  computing in bfloat16): the hooks measure `measurement_model(model)`, without that
  axis and in float32. `config`
  is a validated training config (`validate_config` checks `config.probes` once).
  `last_step`: the run's final step (its layer probe includes the spectral norms)."""
  if not probe_option(config, "enabled"):
    return []
  model = measurement_model(model)
  hooks: list[tuple[str, int, Callable]] = [
      ("layers", int(probe_option(config, "every_steps")),
       LayerProbeHook(model, int(probe_option(config, "every_steps")),
                      bn_modes=probe_option(config, "bn_modes"),
                      spectral_every=int(probe_option(config, "spectral_every_steps")),
                      last_step=last_step))]
  every = int(probe_option(config, "lipschitz_every_steps"))
  if probe_option(config, "lipschitz"):
    hooks.append(("lipschitz", every, LipschitzHook(
        model, every, num_classes=num_classes,
        bn_modes=probe_option(config, "lipschitz_bn_modes"),
        num_examples=int(probe_option(config, "lipschitz_examples")),
        param=bool(probe_option(config, "param_lipschitz")),
        bound=bool(probe_option(config, "bound")),
        hessian_examples=int(probe_option(config, "hessian_examples")),
        chain_max_dim=int(probe_option(config, "chain_max_dim")))))
  return hooks
