"""EfficientNet-B0..B3 (Tan & Le, 2019) with a swappable normalizer.

Follows the reference TF implementation (tensorflow/tpu `efficientnet_model.py` and
`keras.applications.efficientnet`): the B0 block table below, scaled by a width
coefficient (`round_filters`: to a multiple of 8, never below 90% of the scaled
value) and a depth coefficient (`round_repeats`: ceil). Compound scaling:

  variant  width  depth  dropout
  b0       1.0    1.0    0.2
  b1       1.0    1.1    0.2
  b2       1.1    1.2    0.3
  b3       1.2    1.4    0.3

Stem: 3x3 conv (stride `stem_stride`, 2 in the standard model; 1 suits 32x32 CIFAR
inputs) -> norm -> swish. MBConv blocks: [1x1 expand conv -> norm -> swish] (absent
when the expansion ratio is 1), kxk depthwise conv (feature_group_count = channels) ->
norm -> swish, squeeze-excitation (global average pool -> dense to
max(1, int(block input filters * 0.25)) -> swish -> dense back -> sigmoid, multiplying
the features), 1x1 projection conv -> norm (no activation). A block with stride 1 and
equal input/output filters adds its input (the identity shortcut), with stochastic
depth on the branch in train mode (drop rate `drop_connect_rate * b / num_blocks` for
block b, so the survival probability decays linearly). Top: 1x1 conv
`top_conv` to round_filters(1280) -> norm -> swish, global average pool, dropout, then
the dense `head`.

Normalizer slots (what `norm_layers` indexes) are the convs that carry BatchNorm in
the reference model, in forward order: stem, then per block expand (if any),
depthwise, projection, then the top conv. Convs with a normalizer have no bias; with
`use_bias=True` the others (e.g. with `norm="none"`) have one. The SE dense maps always
have biases. All convs use "SAME" padding (the TF reference's).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lipnorm.models import structure as st
from lipnorm.models.activations import get_activation
from lipnorm.models.common import (ConvNormContext, ConvSpec, check_conv_model,
                                   check_positive, conv_norm, conv_norm_structure,
                                   normalized_conv_slots)
from lipnorm.models.norm_spec import NormSpec

# (repeats, kernel, stride, expand ratio, input filters, output filters) of B0.
B0_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
TOP_FILTERS = 1280
# (width coefficient, depth coefficient, dropout rate) per variant.
VARIANTS = {
    "b0": (1.0, 1.0, 0.2),
    "b1": (1.0, 1.1, 0.2),
    "b2": (1.1, 1.2, 0.3),
    "b3": (1.2, 1.4, 0.3),
}
SE_REASON = ("squeeze-excitation gating x*sigmoid(g(x)): the gate depends on the input, "
             "so the product has no global Lipschitz bound from the layers' norms alone "
             "(the input x is unbounded)")


def round_filters(filters: float, width_coefficient: float, divisor: int = 8) -> int:
  """Channels after width scaling, as in the TF reference: nearest multiple of
  `divisor` (at least `divisor`), bumped up one step if that loses more than 10%."""
  filters *= width_coefficient
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if new < 0.9 * filters:
    new += divisor
  return int(new)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  return int(math.ceil(depth_coefficient * repeats))


class SqueezeExcite(nn.Module):
  """`x * sigmoid(expand(act(reduce(mean_hw(x)))))`, dense maps with bias."""
  reduced: int
  activation: str
  kernel_init: Any
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act, _ = get_activation(self.activation)
    s = jnp.mean(x, axis=(1, 2))
    s = act(nn.Dense(self.reduced, kernel_init=self.kernel_init, dtype=self.dtype,
                          name="reduce")(s))
    s = nn.Dense(x.shape[-1], kernel_init=self.kernel_init, dtype=self.dtype,
                 name="expand")(s)
    return x * jax.nn.sigmoid(s)[:, None, None, :]


class MBConv(nn.Module):
  """Mobile inverted bottleneck block with squeeze-excitation (see module docstring).

  `convs` are the (expand,) depthwise, projection specs; `residual` adds the input,
  with stochastic depth at `drop_rate` when not `deterministic`."""
  convs: tuple[ConvSpec, ...]
  se_reduced: int
  residual: bool
  drop_rate: float
  ctx: ConvNormContext
  activation: str

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    act, _ = get_activation(self.activation)
    h = x
    for spec in self.convs[:-1]:
      h = act(conv_norm(spec, h, self.ctx))
    h = SqueezeExcite(self.se_reduced, self.activation, self.ctx.kernel_init, self.ctx.dtype,
                      name="se")(h)
    h = conv_norm(self.convs[-1], h, self.ctx)
    if not self.residual:
      return h
    if not deterministic and self.drop_rate > 0:
      keep = 1.0 - self.drop_rate
      mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (h.shape[0], 1, 1, 1))
      h = jnp.where(mask, h / keep, 0.0).astype(h.dtype)
    return x + h


class EfficientNet(nn.Module):
  """EfficientNet `[N, H, W, C] -> [N, num_classes]`; variants fix the coefficients.

  Attributes:
    num_classes: output width.
    blocks: the block table before scaling, rows (repeats, kernel, stride, expand
      ratio, input filters, output filters); B0's by default (smaller tables make
      tiny test models).
    stem_filters, top_filters: stem and top conv widths before scaling (32, 1280).
    width_coefficient, depth_coefficient: compound scaling of the block table.
    dropout_rate: dropout before the head (train mode only).
    drop_connect_rate: base stochastic-depth rate (block b drops its branch with
      probability `drop_connect_rate * b / num_blocks`, train mode only).
    stem_stride: stride of the stem conv (2 standard; 1 for 32x32 inputs).
    se_ratio: squeeze-excitation width as a fraction of the block's input filters.
    norm: the normalizer (`NormSpec`: registry name, which conv slots carry it, options).
    activation: activation registry name (swish in the reference).
    use_bias: bias on convs without a normalizer (never before one) and on the head.
    kernel_init: He-normal (fan-in) by default.
    bn_axis_name: the pmap axis BatchNorm syncs its batch statistics over (training
      passes it; None everywhere else).

  Impossible shapes or normalizer settings raise ValueError at construction.
  """
  num_classes: int = 10
  blocks: Sequence[tuple[int, int, int, int, int, int]] = B0_BLOCKS
  stem_filters: int = STEM_FILTERS
  top_filters: int = TOP_FILTERS
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  stem_stride: int = 2
  se_ratio: float = 0.25
  norm: NormSpec = NormSpec("batch")
  activation: str = "swish"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.he_normal()
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  conv_impl: str = "auto"  # "auto" | "xla" | "matmul": see lipnorm.models.conv

  def __post_init__(self):
    check_conv_model(self, self._plan)
    super().__post_init__()

  def _normalized(self, plan) -> frozenset[int]:
    stem, blocks, top, _ = plan
    return normalized_conv_slots(
        self.norm, [stem] + [spec for _, convs, *_ in blocks for spec in convs] + [top])

  def _plan(self):
    """(stem spec, [(name, conv specs, se width, residual?, drop rate)], top spec,
    number of slots)."""
    if not self.width_coefficient > 0 or not self.depth_coefficient > 0:
      raise ValueError(f"EfficientNet width_coefficient={self.width_coefficient} and "
                       f"depth_coefficient={self.depth_coefficient} must be > 0")
    for name in ("dropout_rate", "drop_connect_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"EfficientNet {name}={getattr(self, name)} must be in [0, 1)")
    if self.stem_stride not in (1, 2):
      raise ValueError(f"EfficientNet stem_stride={self.stem_stride}; allowed: [1, 2]")
    check_positive("EfficientNet", num_classes=self.num_classes,
                   stem_filters=self.stem_filters, top_filters=self.top_filters)
    get_activation(self.activation)
    if not self.blocks or any(len(row) != 6 or min(row) < 1 for row in self.blocks):
      raise ValueError(f"EfficientNet blocks={self.blocks!r} must be a non-empty list of "
                       "positive (repeats, kernel, stride, expand, in, out) rows")
    if not 0.0 < self.se_ratio <= 1.0:
      raise ValueError(f"EfficientNet se_ratio={self.se_ratio} must be in (0, 1]")
    wc, dc = self.width_coefficient, self.depth_coefficient
    s = self.stem_stride
    stem = ConvSpec("stem_conv", "stem_norm", round_filters(self.stem_filters, wc), (3, 3),
                    (s, s), "SAME", slot=0)
    slot = 1
    stages = [(round_repeats(r, dc), k, st_, e, round_filters(i, wc), round_filters(o, wc))
              for r, k, st_, e, i, o in self.blocks]
    num_blocks = sum(r for r, *_ in stages)
    blocks = []
    b = 0
    for stage, (repeats, k, stride, expand, in_f, out_f) in enumerate(stages):
      for j in range(repeats):
        if j > 0:
          in_f, stride = out_f, 1
        mid = in_f * expand
        convs = []
        if expand != 1:
          convs.append(ConvSpec("expand_conv", "expand_norm", mid, (1, 1), (1, 1), "SAME",
                                slot=slot))
          slot += 1
        convs.append(ConvSpec("depthwise_conv", "depthwise_norm", mid, (k, k),
                              (stride, stride), "SAME", slot=slot, feature_group_count=mid))
        convs.append(ConvSpec("project_conv", "project_norm", out_f, (1, 1), (1, 1), "SAME",
                              slot=slot + 1))
        slot += 2
        residual = stride == 1 and in_f == out_f
        se_reduced = max(1, int(in_f * self.se_ratio))
        blocks.append((f"stage{stage}_block{j}", tuple(convs), se_reduced, residual,
                       self.drop_connect_rate * b / num_blocks))
        b += 1
    top = ConvSpec("top_conv", "top_norm", round_filters(self.top_filters, wc), (1, 1),
                    (1, 1), "SAME", slot=slot)
    return stem, blocks, top, slot + 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               use_batch_stats: Optional[bool] = None) -> jax.Array:
    """x: `[N, H, W, C]` -> logits `[N, num_classes]`. `train` turns on batch statistics,
    stochastic depth and dropout (those need `rngs={"dropout": key}`); `use_batch_stats`
    overrides the BN behaviour alone."""
    if x.ndim != 4:
      raise ValueError(f"EfficientNet expects NHWC input [N, H, W, C]; got shape {x.shape}")
    plan = self._plan()
    stem, blocks, top, _ = plan
    use_batch = train if use_batch_stats is None else use_batch_stats
    ctx = ConvNormContext(self._normalized(plan), self.norm.factory(self.bn_axis_name),
                          use_batch, self.use_bias, self.kernel_init, self.dtype,
                          conv_impl=self.conv_impl)
    act, _ = get_activation(self.activation)
    h = act(conv_norm(stem, x.astype(self.dtype), ctx))
    for name, convs, se_reduced, residual, drop_rate in blocks:
      h = MBConv(convs, se_reduced, residual, drop_rate, ctx, self.activation,
                 name=name)(h, deterministic=not train)
    h = act(conv_norm(top, h, ctx))
    h = jnp.mean(h, axis=(1, 2))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init,
                    dtype=self.dtype, name="head")(h)

  def structure(self) -> st.Sequential:
    """Eval-mode structure (stochastic depth and dropout are the identity there)."""
    plan = self._plan()
    stem, blocks, top, _ = plan
    normalized = self._normalized(plan)
    norm, eps = self.norm.name, self.norm.epsilon
    _, lip = get_activation(self.activation)
    _, sigmoid_lip = get_activation("sigmoid")
    act = st.Activation(self.activation, lip)
    layers: list[st.Node] = [conv_norm_structure(stem, (), normalized, norm, eps), act]
    for name, convs, _, residual, _ in blocks:
      parts = []
      for spec in convs[:-1]:
        parts += [conv_norm_structure(spec, (name,), normalized, norm, eps), act]
      se_inner = st.seq(st.Pool("global_avg"), st.Linear((name, "se", "reduce"), "dense"),
                        act,
                        st.Linear((name, "se", "expand"), "dense"),
                        st.Activation("sigmoid", sigmoid_lip))
      parts.append(st.Unbounded(SE_REASON, (name, "se"), se_inner))
      parts.append(conv_norm_structure(convs[-1], (name,), normalized, norm, eps))
      branch = st.seq(*parts)
      layers.append(st.Residual(branch) if residual else branch)
    layers += [conv_norm_structure(top, (), normalized, norm, eps), act,
               st.Pool("global_avg"), st.Linear(("head",), "dense")]
    return st.seq(*layers)
