"""A small VGG-style CNN for CPU-scale experiments: stages of `3x3 conv -> norm -> act`.

Layout for `widths=(16, 32, 64)`, `convs_per_stage=2` on an `[N, H, W, C]` input:

  stage 0: conv_0, conv_1 (16 channels)
  downsample by 2
  stage 1: conv_2, conv_3 (32 channels)
  downsample by 2
  stage 2: conv_4, conv_5 (64 channels)
  global average pool -> head (dense, num_classes)

Each conv `conv_i` is followed by `norm_i` when i is in the normalized set and then the
activation. Convs are numbered across stages, so `norm_layers` ("all", the first k, or
a list) indexes them directly. Downsampling is linear so the bound code can handle it:
`"avg_pool"` (2x2 window, stride 2, operator norm exactly 1/2 when H, W are even) or
`"strided_conv"` (the first conv of each later stage has stride 2).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lipnorm.models import structure as st
from lipnorm.models.activations import get_activation
from lipnorm.models.common import NormLayers, normalized_indices
from lipnorm.normalizers import get_normalizer

DOWNSAMPLES = ("avg_pool", "strided_conv")


class CNN(nn.Module):
  """VGG-style CNN `[N, H, W, C] -> [N, num_classes]` with a swappable normalizer.

  Attributes:
    num_classes: output width.
    widths: channels of each stage (one stage per entry).
    convs_per_stage: 3x3 convs per stage (>= 1).
    norm: normalizer registry name.
    norm_layers: which convs (0-based, numbered across stages) carry it: "all", the
      first k, or a list.
    norm_options: keyword options for `get_normalizer`.
    activation: activation registry name.
    downsample: "avg_pool" or "strided_conv" (between stages; both linear maps).
    use_bias: bias on convs without a normalizer (never before one) and on the head.
    kernel_init: He-normal (fan-in = 3*3*C_in) by default.
  """
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)
  convs_per_stage: int = 2
  norm: str = "none"
  norm_layers: NormLayers = "all"
  norm_options: Optional[dict] = None
  activation: str = "relu"
  downsample: str = "avg_pool"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.he_normal()
  dtype: Any = jnp.float32

  @property
  def num_convs(self) -> int:
    return len(self.widths) * self.convs_per_stage

  def _check(self) -> None:
    if not self.widths or any(int(w) < 1 for w in self.widths):
      raise ValueError(f"CNN widths={tuple(self.widths)} must be a non-empty list of "
                       "positive channel counts")
    if self.convs_per_stage < 1:
      raise ValueError(f"CNN convs_per_stage={self.convs_per_stage} must be >= 1")
    if self.downsample not in DOWNSAMPLES:
      raise ValueError(f"CNN downsample={self.downsample!r}; allowed: {list(DOWNSAMPLES)}")

  def _normalized(self) -> frozenset[int]:
    self._check()
    if self.norm == "none":
      get_normalizer("none")
      return frozenset()
    return normalized_indices(self.norm_layers, self.num_convs)

  def _layout(self):
    """(conv index, width, stride, pool_before) for every conv, in forward order."""
    out = []
    for s, width in enumerate(self.widths):
      for j in range(self.convs_per_stage):
        i = s * self.convs_per_stage + j
        first_of_later_stage = s > 0 and j == 0
        stride = 2 if first_of_later_stage and self.downsample == "strided_conv" else 1
        pool = first_of_later_stage and self.downsample == "avg_pool"
        out.append((i, int(width), stride, pool))
    return out

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               use_batch_stats: Optional[bool] = None) -> jax.Array:
    """x: `[N, H, W, C]` -> logits `[N, num_classes]`. `train` turns on batch statistics
    (and their running update when `batch_stats` is mutable); `use_batch_stats`
    overrides that for BN alone."""
    if x.ndim != 4:
      raise ValueError(f"CNN expects NHWC input [N, H, W, C]; got shape {x.shape}")
    use_batch = train if use_batch_stats is None else use_batch_stats
    normalized = self._normalized()
    norm_factory = get_normalizer(self.norm, **(self.norm_options or {}))
    act, _ = get_activation(self.activation)
    h = x.astype(self.dtype)
    for i, width, stride, pool in self._layout():
      if pool:
        h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="VALID")
      has_norm = i in normalized
      h = nn.Conv(width, (3, 3), strides=(stride, stride), padding="SAME",
                  use_bias=self.use_bias and not has_norm, kernel_init=self.kernel_init,
                  dtype=self.dtype, name=f"conv_{i}")(h)
      if has_norm:
        h = norm_factory(name=f"norm_{i}")(h, use_running_average=not use_batch)
      h = act(h)
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init,
                    dtype=self.dtype, name="head")(h)

  def structure(self) -> st.Sequential:
    normalized = self._normalized()
    eps = (self.norm_options or {}).get("epsilon", 1e-5)
    _, lip = get_activation(self.activation)
    layers: list[st.Node] = []
    for i, _, stride, pool in self._layout():
      if pool:
        layers.append(st.Pool("avg", (2, 2), (2, 2), "VALID"))
      layers.append(st.Linear((f"conv_{i}",), "conv", (stride, stride), "SAME", 1))
      if i in normalized:
        layers.append(st.Norm((f"norm_{i}",), self.norm, eps))
      layers.append(st.Activation(self.activation, lip))
    layers.append(st.Pool("global_avg"))
    layers.append(st.Linear(("head",), "dense"))
    return st.seq(*layers)
