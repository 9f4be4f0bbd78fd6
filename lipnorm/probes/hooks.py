"""Training-loop hooks that record probes (used by `lipnorm.training.hooks.build_hooks`).

A hook has `every: int` and `__call__(step, variables, probe_batch) -> dict[str, float |
list]`; the training loop calls it when `step % every == 0` and writes the result as a
JSONL record of kind "probe" (and to TensorBoard). Hooks only read `variables`: they
never touch the optimizer state, the data order or any PRNG key of training, so a run
with probes on ends with the same parameters as one with probes off.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lipnorm.probes.prober import LayerProber, flatten_probes


def probe_inputs(probe_batch: Any) -> jax.Array:
  """The images of a probe batch (`{"image": [N, ...], "label": [N]}` or an array)."""
  if isinstance(probe_batch, Mapping):
    return jnp.asarray(probe_batch["image"])
  return jnp.asarray(probe_batch)


class LayerProbeHook:
  """Per-layer statistics (`LayerProber`) every `every` steps, flattened to lists."""

  def __init__(self, model: nn.Module, every: int, *, bn_modes: Sequence[str] = ("eval",),
               spectral: bool = True):
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"LayerProbeHook every={every!r} must be a positive integer")
    self.every = every
    self.prober = LayerProber(model, bn_modes=bn_modes, spectral=spectral)

  def __call__(self, step: int, variables: Any, probe_batch: Any) -> dict:
    del step
    return flatten_probes(self.prober(variables, probe_inputs(probe_batch)))
