"""ResNet-18/34 (BasicBlock) and ResNet-50 (Bottleneck) with a swappable normalizer.

Stems: `"cifar"` (3x3 conv, stride 1, no max-pool: the widely used CIFAR ResNet of
kuangliu/pytorch-cifar) or `"imagenet"` (7x7 conv stride 2, then 3x3 max-pool stride
2, as in torchvision). Stages of blocks with widths `width * 2**s`; the first block of
every later stage has stride 2 (on its 3x3 conv, as in torchvision's ResNet v1.5).
A block whose stride or width changes has a projection shortcut (1x1 conv stride s,
then a normalizer); otherwise the shortcut is the identity. Global average pool, then
a dense head with bias.

Every conv is a normalizer slot, numbered in forward order: the stem conv is slot 0;
inside each block the shortcut conv (when present) comes before the branch convs.
`norm_layers` indexes these slots ("all", the first k, or a list). A conv that carries
a normalizer has no bias; with `use_bias=True` (the default) every other conv has one,
so `norm="none"` gives the biased convs of the unnormalized DNN while the BN model
keeps the reference parameter count (ResNet-18, CIFAR stem, 10 classes: 11,173,962).
3x3 and 7x7 convs use explicit symmetric padding (k // 2 on each side, as in PyTorch),
1x1 convs "VALID".
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

BLOCKS = ("basic", "bottleneck")
STEMS = ("cifar", "imagenet")
BOTTLENECK_EXPANSION = 4
_MAX_POOL = st.Pool("max", (3, 3), (2, 2), ((1, 1), (1, 1)))


def _pad(k: int):
  return "VALID" if k == 1 else ((k // 2, k // 2), (k // 2, k // 2))


class ResidualBlock(nn.Module):
  """`act(shortcut(x) + branch(x))`, branch = convs (each with its normalizer slot) with
  the activation between them. Used for both BasicBlock (two 3x3) and Bottleneck
  (1x1, 3x3, 1x1). `shortcut=()` is the identity."""
  branch: tuple[ConvSpec, ...]
  shortcut: tuple[ConvSpec, ...]
  ctx: ConvNormContext
  activation: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act, _ = get_activation(self.activation)
    sc = x
    for spec in self.shortcut:       # created first: params order = structure order
      sc = conv_norm(spec, sc, self.ctx)
    h = x
    for i, spec in enumerate(self.branch):
      h = conv_norm(spec, h, self.ctx)
      if i < len(self.branch) - 1:
        h = act(h)
    return act(h + sc)


class ResNet(nn.Module):
  """ResNet `[N, H, W, C] -> [N, num_classes]`.

  Attributes:
    num_classes: output width.
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1 with 4x expansion).
    width: channels of the stem and of the first stage (stage s has `width * 2**s`).
    stem: "cifar" (3x3 stride 1) or "imagenet" (7x7 stride 2 + 3x3 max-pool stride 2).
    norm: the normalizer (`NormSpec`: registry name, which conv slots carry it, options).
    activation: activation registry name.
    use_bias: bias on convs without a normalizer (never before one) and on the head.
    kernel_init: He-normal (fan-in) by default.
    bn_axis_name: the pmap axis BatchNorm syncs its batch statistics over (training
      passes it; None everywhere else).

  Impossible shapes or normalizer settings raise ValueError at construction.
  """
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  width: int = 64
  stem: str = "cifar"
  norm: NormSpec = NormSpec("batch")
  activation: str = "relu"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.he_normal()
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  conv_impl: str = "auto"  # "auto" | "xla" | "matmul": see lipnorm.models.conv

  def __post_init__(self):
    check_conv_model(self, self._plan)
    super().__post_init__()

  def _normalized(self, plan) -> frozenset[int]:
    stem, blocks, _ = plan
    specs = [stem] + [spec for _, shortcut, branch in blocks for spec in shortcut + branch]
    return normalized_conv_slots(self.norm, specs)

  def _plan(self):
    """(stem spec, [(block name, shortcut specs, branch specs)], number of slots)."""
    if self.block not in BLOCKS:
      raise ValueError(f"ResNet block={self.block!r}; allowed: {list(BLOCKS)}")
    if self.stem not in STEMS:
      raise ValueError(f"ResNet stem={self.stem!r}; allowed: {list(STEMS)}")
    if (not isinstance(self.stage_sizes, Sequence) or not self.stage_sizes
        or not all(map(is_positive_int, self.stage_sizes))):
      raise ValueError(f"ResNet stage_sizes={tuple(self.stage_sizes)} must be a non-empty "
                       "list of positive block counts")
    check_positive("ResNet", num_classes=self.num_classes, width=self.width)
    get_activation(self.activation)
    k, s = (3, 1) if self.stem == "cifar" else (7, 2)
    stem = ConvSpec("stem_conv", "stem_norm", self.width, (k, k), (s, s), _pad(k), slot=0)
    slot = 1
    blocks = []
    in_ch = self.width
    for stage, n_blocks in enumerate(self.stage_sizes):
      planes = self.width * 2 ** stage
      for b in range(int(n_blocks)):
        stride = 2 if stage > 0 and b == 0 else 1
        out_ch = planes * (BOTTLENECK_EXPANSION if self.block == "bottleneck" else 1)
        shortcut = ()
        if stride != 1 or in_ch != out_ch:
          shortcut = (ConvSpec("shortcut_conv", "shortcut_norm", out_ch, (1, 1),
                               (stride, stride), "VALID", slot=slot),)
          slot += 1
        if self.block == "basic":
          shapes = [(planes, 3, stride), (planes, 3, 1)]
        else:
          shapes = [(planes, 1, 1), (planes, 3, stride), (out_ch, 1, 1)]
        branch = []
        for i, (features, kk, ss) in enumerate(shapes):
          branch.append(ConvSpec(f"conv_{i}", f"norm_{i}", features, (kk, kk), (ss, ss),
                                 _pad(kk), slot=slot))
          slot += 1
        blocks.append((f"stage{stage}_block{b}", shortcut, tuple(branch)))
        in_ch = out_ch
    return stem, blocks, slot

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               use_batch_stats: Optional[bool] = None) -> jax.Array:
    """x: `[N, H, W, C]` -> logits `[N, num_classes]`. `train` turns on batch statistics
    (and their running update when `batch_stats` is mutable); `use_batch_stats`
    overrides that for BN alone."""
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC input [N, H, W, C]; got shape {x.shape}")
    plan = self._plan()
    stem, blocks, _ = plan
    use_batch = train if use_batch_stats is None else use_batch_stats
    ctx = ConvNormContext(self._normalized(plan), self.norm.factory(self.bn_axis_name),
                          use_batch, self.use_bias, self.kernel_init, self.dtype,
                          conv_impl=self.conv_impl)
    act, _ = get_activation(self.activation)
    h = act(conv_norm(stem, x.astype(self.dtype), ctx))
    if self.stem == "imagenet":
      h = nn.max_pool(h, _MAX_POOL.window, strides=_MAX_POOL.strides,
                      padding=_MAX_POOL.padding)
    for name, shortcut, branch in blocks:
      h = ResidualBlock(branch, shortcut, ctx, self.activation, name=name)(h)
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init,
                    dtype=self.dtype, name="head")(h)

  def structure(self) -> st.Sequential:
    plan = self._plan()
    stem, blocks, _ = plan
    normalized = self._normalized(plan)
    norm, eps = self.norm.name, self.norm.epsilon
    _, lip = get_activation(self.activation)
    act = st.Activation(self.activation, lip)
    layers: list[st.Node] = [conv_norm_structure(stem, (), normalized, norm, eps), act]
    if self.stem == "imagenet":
      layers.append(_MAX_POOL)
    for name, shortcut, branch in blocks:
      parts = []
      for i, spec in enumerate(branch):
        parts.append(conv_norm_structure(spec, (name,), normalized, norm, eps))
        if i < len(branch) - 1:
          parts.append(act)
      sc = (conv_norm_structure(shortcut[0], (name,), normalized, norm, eps)
            if shortcut else None)
      layers += [st.Residual(st.seq(*parts), sc), act]
    return st.seq(*layers, st.Pool("global_avg"), st.Linear(("head",), "dense"))
