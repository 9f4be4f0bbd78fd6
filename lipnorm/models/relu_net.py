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
from lipnorm.models.common import check_positive
from lipnorm.models.norm_spec import NormSpec, coerce_norm


class ReLUNet(nn.Module):
  """MLP on flattened inputs `[N, ...] -> [N, num_classes]` with a swappable normalizer.

  Attributes:
    num_classes: output width.
    depth: number of linear maps L (>= 1); `depth - 1` hidden layers.
    width: hidden width.
    norm: the normalizer (`NormSpec`: registry name `none`, `batch`, `layer`, `group`,
      ...; which hidden layers (0-based) carry it; its options). Per-sample groups of a
      single feature (`instance`, or GN with one feature per group) are refused: they
      make the network constant.
    activation: activation registry name.
    use_bias: bias on unnormalized layers (never before a normalizer).
    kernel_init: He-normal (fan-in, variance 2/fan_in) by default.
    bn_axis_name: the pmap axis BatchNorm syncs its batch statistics over (training
      passes it; None everywhere else).

  Impossible shapes or normalizer settings raise ValueError at construction.
  """
  num_classes: int = 10
  depth: int = 10
  width: int = 512
  norm: NormSpec = NormSpec()
  activation: str = "relu"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.he_normal()
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  def __post_init__(self):
    coerce_norm(self)
    self._normalized()   # validate before any work
    super().__post_init__()

  def _normalized(self) -> frozenset[int]:
    check_positive("ReLUNet", num_classes=self.num_classes, depth=self.depth,
                   width=self.width)
    get_activation(self.activation)
    normalized = self.norm.slots(self.depth - 1)
    if normalized:
      self.norm.check_channels(self.width, spatial=False)
    return normalized

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               use_batch_stats: Optional[bool] = None) -> jax.Array:
    """x: `[N, ...]` -> logits `[N, num_classes]`. `train` turns on batch statistics
    (and their running update when `batch_stats` is mutable); `use_batch_stats`
    overrides that for BN alone (used by the Lipschitz engine's batch modes)."""
    use_batch = train if use_batch_stats is None else use_batch_stats
    normalized = self._normalized()
    norm_factory = self.norm.factory(self.bn_axis_name)
    act, _ = get_activation(self.activation)
    h = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i in range(self.depth - 1):
      has_norm = i in normalized
      h = nn.Dense(self.width, use_bias=self.use_bias and not has_norm,
                   kernel_init=self.kernel_init, dtype=self.dtype, name=f"dense_{i}")(h)
      if has_norm:
        h = norm_factory(name=f"norm_{i}")(h, use_batch_stats=use_batch)
      h = act(h)
    return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init,
                    dtype=self.dtype, name=f"dense_{self.depth - 1}")(h)

  def structure(self) -> st.Sequential:
    normalized = self._normalized()
    eps = self.norm.epsilon
    _, lip = get_activation(self.activation)
    layers: list[st.Node] = [st.Flatten()]
    for i in range(self.depth - 1):
      layers.append(st.Linear((f"dense_{i}",), "dense"))
      if i in normalized:
        layers.append(st.Norm((f"norm_{i}",), self.norm.name, eps))
      layers.append(st.Activation(self.activation, lip))
    layers.append(st.Linear((f"dense_{self.depth - 1}",), "dense"))
    return st.seq(*layers)
