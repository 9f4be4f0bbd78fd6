"""A 2-D convolution with a switchable implementation, parameter-compatible with `nn.Conv`.

Why: XLA's CPU convolutions (above all the kernel gradient) run several times slower
than the same arithmetic written as matrix products. `conv_impl="matmul"` computes the
convolution as plain `jnp` slicing and matmuls, differentiated by JAX itself (no
custom_vjp), so jvp, vjp, jacfwd, jacrev, `jax.linear_transpose` and Hessian-vector
products work exactly as with `lax.conv_general_dilated`.

For an NHWC input `x` and an HWIO kernel `k` `[kh, kw, C/groups, F]`, after zero
padding, each kernel tap (i, j) reads the strided slice

  x_ij = x_pad[:, i : i + (Ho-1)*sh + 1 : sh, j : j + (Wo-1)*sw + 1 : sw, :]   [N, Ho, Wo, C]

and the output is `sum_ij x_ij @ k[i, j]` (per group). The implementations:

  "xla"     `lax.conv_general_dilated` (what `nn.Conv` calls).
  "matmul"  groups == 1: the taps concatenated along channels (im2col) times the kernel
            reshaped to `[kh*kw*C, F]`, one matmul; depthwise (C/groups == 1): a sum of
            elementwise products of the taps with the kernel rows; other grouped convs:
            a per-group einsum of each tap.
  "auto"    on CPU (`jax.default_backend()` at trace time): "matmul" for grouped and
            depthwise convs, "xla" for ordinary ones; "xla" on GPU/TPU. Measured on 2
            CPU cores (bench/torch_side_by_side.py): XLA's CPU depthwise convs make an
            EfficientNet-B0 train step ~17x slower than the matmul form, while for
            ordinary convs (ResNet-18, the CNN) the matmul form was 0-30% slower.

`Conv` is `nn.Conv` plus the `conv_impl` field, with the same parameter tree (`kernel`
`[kh, kw, C/groups, F]`, `bias` `[F]`), so checkpoints move freely between
implementations.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.linear import canonicalize_padding
from jax import lax

CONV_IMPLS = ("auto", "xla", "matmul")

Padding = Union[str, int, Sequence[Union[int, tuple[int, int]]]]


def check_conv_impl(conv_impl: str) -> str:
  """`conv_impl` itself when valid; ValueError naming it and the valid names otherwise."""
  if not isinstance(conv_impl, str) or conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={conv_impl!r}; valid names: {', '.join(CONV_IMPLS)}")
  return conv_impl


def resolve_conv_impl(conv_impl: str, feature_group_count: int = 1) -> str:
  """The concrete implementation ("xla" or "matmul") that `conv_impl` selects now for a
  conv with `feature_group_count` groups."""
  if check_conv_impl(conv_impl) == "auto":
    return ("matmul" if jax.default_backend() == "cpu" and feature_group_count > 1
            else "xla")
  return conv_impl


def _explicit_pads(padding: Padding, in_hw: Sequence[int], kernel_hw: Sequence[int],
                   strides: Sequence[int]) -> list[tuple[int, int]]:
  """`padding` as explicit (low, high) pairs per spatial dim, as `lax` resolves it."""
  pads = canonicalize_padding(padding, len(kernel_hw))
  if isinstance(pads, str):
    if pads.upper() not in ("SAME", "SAME_LOWER", "VALID"):
      raise ValueError(f"conv padding={padding!r}; supported: 'SAME', 'SAME_LOWER', "
                       "'VALID', an int or explicit (low, high) pairs")
    pads = lax.padtype_to_pads(in_hw, kernel_hw, strides, pads.upper())
  return [(int(lo), int(hi)) for lo, hi in pads]


def _matmul_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 pads: list[tuple[int, int]], groups: int, precision: Any) -> jax.Array:
  """The convolution of NHWC `x` with HWIO `kernel` from slices and matmuls."""
  n, h, w, c = x.shape
  kh, kw, cg, f = kernel.shape
  sh, sw = strides
  if c != cg * groups or f % groups:
    raise ValueError(f"conv: input channels {c} / kernel {kernel.shape} do not match "
                     f"feature_group_count={groups}")
  ho = (h + pads[0][0] + pads[0][1] - kh) // sh + 1
  wo = (w + pads[1][0] + pads[1][1] - kw) // sw + 1
  if ho < 1 or wo < 1:
    raise ValueError(f"conv: kernel {kh}x{kw} with padding {pads} is larger than the "
                     f"input {h}x{w}")
  if any(p != 0 for pair in pads for p in pair):
    # lax.pad also crops for negative pads, as lax.conv does.
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), pads[0] + (0,), pads[1] + (0,),
                                            (0, 0, 0)))

  def tap(i: int, j: int) -> jax.Array:  # [N, Ho, Wo, C]
    return lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                     (1, sh, sw, 1))

  taps = [(i, j) for i in range(kh) for j in range(kw)]
  if groups == 1:
    cols = tap(*taps[0]) if len(taps) == 1 else jnp.concatenate(
        [tap(i, j) for i, j in taps], axis=-1)
    y = jnp.dot(cols.reshape(n * ho * wo, kh * kw * c), kernel.reshape(kh * kw * c, f),
                precision=precision)
    return y.reshape(n, ho, wo, f)
  m = f // groups  # output features per group (lax orders them group-major)
  if cg == 1:      # depthwise (times a channel multiplier m)
    y = None
    for i, j in taps:
      t = tap(i, j)
      term = (t * kernel[i, j, 0] if m == 1 else
              (t[..., None] * kernel[i, j, 0].reshape(groups, m)).reshape(n, ho, wo, f))
      y = term if y is None else y + term
    return y
  y = None
  for i, j in taps:
    term = jnp.einsum("nhwgc,cgd->nhwgd", tap(i, j).reshape(n, ho, wo, groups, cg),
                      kernel[i, j].reshape(cg, groups, m), precision=precision)
    y = term if y is None else y + term
  return y.reshape(n, ho, wo, f)


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Padding = "SAME", feature_group_count: int = 1,
           conv_impl: str = "auto", precision: Any = None) -> jax.Array:
  """NHWC `x` `[N, H, W, C]` convolved with HWIO `kernel` `[kh, kw, C/groups, F]` ->
  `[N, Ho, Wo, F]`, the same numbers as `lax.conv_general_dilated` with NHWC/HWIO/NHWC
  dimension numbers, by the implementation `conv_impl` selects (see module docstring)."""
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"conv2d expects NHWC input and HWIO kernel; got shapes {x.shape}, "
                     f"{kernel.shape}")
  strides = tuple(int(s) for s in strides)
  impl = resolve_conv_impl(conv_impl, int(feature_group_count))
  pads = _explicit_pads(padding, x.shape[1:3], kernel.shape[:2], strides)
  if impl == "xla":
    return lax.conv_general_dilated(x, kernel, strides, pads,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=feature_group_count,
                                    precision=precision)
  return _matmul_conv(x, kernel, strides, pads, int(feature_group_count), precision)


class Conv(nn.Conv):
  """`nn.Conv` (a subclass: same fields, same `isinstance`) with a `conv_impl` switch
  ("auto", "xla", "matmul") for NHWC images.

  The parameters `kernel` `[kh, kw, C/feature_group_count, features]` and `bias`
  `[features]` are created exactly as `nn.Conv` creates them (same names, shapes,
  initializers and RNG use), so variables are interchangeable with `nn.Conv` and between
  the settings; "xla" makes the same `lax.conv_general_dilated` call. Supports what the
  zoo uses: no input/kernel dilation, no mask, shared weights.
  """
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """inputs: `[N, H, W, C]` -> `[N, Ho, Wo, features]`."""
    check_conv_impl(self.conv_impl)
    x = inputs
    if x.ndim != 4:
      raise ValueError(f"Conv expects NHWC input [N, H, W, C]; got shape {x.shape}")
    if (self.mask is not None or not self.shared_weights
        or self.input_dilation not in (None, 1, (1, 1))
        or self.kernel_dilation not in (None, 1, (1, 1))):
      raise ValueError("lipnorm.models.conv.Conv supports no dilation, mask or unshared "
                       "weights; use flax.linen.Conv")
    kernel_size = ((self.kernel_size,) * 2 if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    strides = ((self.strides,) * 2 if isinstance(self.strides, int)
               else tuple(self.strides or (1, 1)))
    c = x.shape[-1]
    if c % self.feature_group_count:
      raise ValueError(f"Conv: {c} input channels not divisible by "
                       f"feature_group_count={self.feature_group_count}")
    kernel = self.param("kernel", self.kernel_init,
                        kernel_size + (c // self.feature_group_count, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = self.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, strides, self.padding, self.feature_group_count, self.conv_impl,
               self.precision)
    if bias is not None:
      y = y + bias
    return y
