"""The fully connected network of docs/theory.md#dnn ("DNN" and "normalized DNN").

`depth` counts linear maps: `z_l = W_l h_{l-1} + b_l`, `h_l = phi(N_l(z_l))` for the
`depth - 1` hidden layers (N_l the identity off the normalized set S), `f(x) = z_L`.
A hidden layer that carries a normalizer has no bias (the normalizer's mean removes it).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from lipnorm.models import structure as st
from lipnorm.models.activations import get_activation
from lipnorm.models.common import NormLayers, norm_epsilon, normalized_slots
from lipnorm.normalizers import get_normalizer


class ReLUNet(nn.Module):
  """MLP on flattened inputs `[N, ...] -> [N, num_classes]` with a swappable normalizer.

  Attributes:
    num_classes: output width.
    depth: number of linear maps L (>= 1); `depth - 1` hidden layers.
    width: hidden width.
    norm: normalizer registry name (`none`, `batch`, `layer`, `group`, ...).
    norm_layers: which hidden layers (0-based) carry it: "all", the first k, or a list.
    norm_options: keyword options for `get_normalizer`.
    activation: activation registry name.
    use_bias: bias on unnormalized layers (never before a normalizer).
    kernel_init: He-normal (fan-in, variance 2/fan_in) by default.
  """
  num_classes: int = 10
  depth: int = 10
  width: int = 512
  norm: str = "none"
  norm_layers: NormLayers = "all"
  norm_options: Optional[dict] = None
  activation: str = "relu"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.he_normal()
  dtype: Any = jnp.float32

  def _normalized(self) -> frozenset[int]:
    if self.depth < 1:
      raise ValueError(f"ReLUNet depth={self.depth} must be >= 1")
    return normalized_slots(self.norm, self.norm_layers, self.depth - 1, self.norm_options)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               use_batch_stats: Optional[bool] = None) -> jax.Array:
    """x: `[N, ...]` -> logits `[N, num_classes]`. `train` turns on batch statistics
    (and their running update when `batch_stats` is mutable); `use_batch_stats`
    overrides that for BN alone (used by the Lipschitz engine's batch modes)."""
    use_batch = train if use_batch_stats is None else use_batch_stats
    normalized = self._normalized()
    norm_factory = get_normalizer(self.norm, **(self.norm_options or {}))
    act, _ = get_activation(self.activation)
    h = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i in range(self.depth - 1):
      has_norm = i in normalized
      h = nn.Dense(self.width, use_bias=self.use_bias and not has_norm,
                   kernel_init=self.kernel_init, dtype=self.dtype, name=f"dense_{i}")(h)
      if has_norm:
        h = norm_factory(name=f"norm_{i}")(h, use_running_average=not use_batch)
      h = act(h)
    return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init,
                    dtype=self.dtype, name=f"dense_{self.depth - 1}")(h)

  def structure(self) -> st.Sequential:
    normalized = self._normalized()
    eps = norm_epsilon(self.norm_options)
    _, lip = get_activation(self.activation)
    layers: list[st.Node] = [st.Flatten()]
    for i in range(self.depth - 1):
      layers.append(st.Linear((f"dense_{i}",), "dense"))
      if i in normalized:
        layers.append(st.Norm((f"norm_{i}",), self.norm, eps))
      layers.append(st.Activation(self.activation, lip))
    layers.append(st.Linear((f"dense_{self.depth - 1}",), "dense"))
    return st.seq(*layers)
