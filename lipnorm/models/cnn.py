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
`"avg_pool"` (2x2 window, stride 2, VALID; operator norm exactly 1/2 when H, W are
even) or `"strided_conv"` (the first conv of each later stage has stride 2). Convs use
"SAME" padding.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lipnorm.models import structure as st
from lipnorm.models.activations import get_activation
from lipnorm.models.common import (ConvNormContext, ConvSpec, check_conv_model,
                                   check_positive, conv_norm, conv_norm_structure,
                                   is_positive_int, normalized_conv_slots)
from lipnorm.models.norm_spec import NormSpec

DOWNSAMPLES = ("avg_pool", "strided_conv")
_POOL = st.Pool("avg", (2, 2), (2, 2), "VALID")


class CNN(nn.Module):
  """VGG-style CNN `[N, H, W, C] -> [N, num_classes]` with a swappable normalizer.

  Attributes:
    num_classes: output width.
    widths: channels of each stage (one stage per entry).
    convs_per_stage: 3x3 convs per stage (>= 1).
    norm: the normalizer (`NormSpec`: registry name, which convs (0-based, numbered
      across stages) carry it -- "all", the first k, or a list -- and its options).
    activation: activation registry name.
    downsample: "avg_pool" or "strided_conv" (between stages; both linear maps).
    use_bias: bias on convs without a normalizer (never before one) and on the head.
    kernel_init: He-normal (fan-in = 3*3*C_in) by default.
    bn_axis_name: the pmap axis BatchNorm syncs its batch statistics over (training
      passes it; None everywhere else).

  Impossible shapes or normalizer settings raise ValueError at construction.
  """
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)
  convs_per_stage: int = 2
  norm: NormSpec = NormSpec()
  activation: str = "relu"
  downsample: str = "avg_pool"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.he_normal()
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  conv_impl: str = "auto"  # "auto" | "xla" | "matmul": see lipnorm.models.conv

  def __post_init__(self):
    check_conv_model(self, self._layout)
    super().__post_init__()

  def _layout(self) -> list[tuple[bool, ConvSpec]]:
    """(avg-pool before it?, spec) for every conv, in forward order."""
    if (not isinstance(self.widths, Sequence) or isinstance(self.widths, str)
        or not self.widths or not all(map(is_positive_int, self.widths))):
      raise ValueError(f"CNN widths={self.widths!r} must be a non-empty list of "
                       "positive channel counts")
    check_positive("CNN", num_classes=self.num_classes, convs_per_stage=self.convs_per_stage)
    get_activation(self.activation)
    if self.downsample not in DOWNSAMPLES:
      raise ValueError(f"CNN downsample={self.downsample!r}; allowed: {list(DOWNSAMPLES)}")
    out = []
    for s, width in enumerate(self.widths):
      for j in range(self.convs_per_stage):
        i = s * self.convs_per_stage + j
        downsample_here = s > 0 and j == 0
        stride = 2 if downsample_here and self.downsample == "strided_conv" else 1
        spec = ConvSpec(f"conv_{i}", f"norm_{i}", int(width), (3, 3), (stride, stride),
                        "SAME", slot=i)
        out.append((downsample_here and self.downsample == "avg_pool", spec))
    return out

  def _normalized(self, layout) -> frozenset[int]:
    return normalized_conv_slots(self.norm, [spec for _, spec in layout])

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               use_batch_stats: Optional[bool] = None) -> jax.Array:
    """x: `[N, H, W, C]` -> logits `[N, num_classes]`. `train` turns on batch statistics
    (and their running update when `batch_stats` is mutable); `use_batch_stats`
    overrides that for BN alone."""
    if x.ndim != 4:
      raise ValueError(f"CNN expects NHWC input [N, H, W, C]; got shape {x.shape}")
    layout = self._layout()
    use_batch = train if use_batch_stats is None else use_batch_stats
    ctx = ConvNormContext(self._normalized(layout),
                          self.norm.factory(self.bn_axis_name),
                          use_batch, self.use_bias, self.kernel_init, self.dtype,
                          conv_impl=self.conv_impl)
    act, _ = get_activation(self.activation)
    h = x.astype(self.dtype)
    for pool, spec in layout:
      if pool:
        h = nn.avg_pool(h, _POOL.window, strides=_POOL.strides, padding=_POOL.padding)
      h = act(conv_norm(spec, h, ctx))
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init,
                    dtype=self.dtype, name="head")(h)

  def structure(self) -> st.Sequential:
    layout = self._layout()
    normalized = self._normalized(layout)
    eps = self.norm.epsilon
    _, lip = get_activation(self.activation)
    layers: list[st.Node] = []
    for pool, spec in layout:
      layers += [_POOL if pool else None,
                 conv_norm_structure(spec, (), normalized, self.norm.name, eps),
                 st.Activation(self.activation, lip)]
    return st.seq(*layers, st.Pool("global_avg"), st.Linear(("head",), "dense"))
