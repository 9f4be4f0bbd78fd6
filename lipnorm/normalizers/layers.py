"""Normalization layers, written out so every statistic they use is visible and testable.

All layers take inputs with the batch on axis 0 and features (channels) on the last axis:
`[N, D]` after a dense map, `[N, H, W, C]` after a convolution. Each normalizes groups u
of its input as `gamma * (u - mean(u)) / sqrt(var(u) + eps) + beta` (RMSNorm without the
mean), with per-channel `scale` (gamma, shape `[C]`) and `bias` (beta, shape `[C]`).

Groups (docs/theory.md#normalizers):
  * batch:    one channel across the batch and all spatial positions -> stats `[C]`
  * layer:    one sample, all its features (and positions)          -> stats `[N]`
  * group:    one sample x one group of C/G channels (x positions)  -> stats `[N, G]`
  * instance: one sample x one channel (x positions), GN with G = C -> stats `[N, C]`
  * rms:      one sample, all its features, no centering            -> stats `[N]`

Every layer sows the statistics of the input it actually saw into the collection
`"norm_stats"` (only when that collection is mutable, so training pays nothing):
`mean` and `var` (population mean / variance of each group of this input) and
`sigma2`, the quantity the layer divided by (before `+ eps`): the same `var` for
centering layers in batch mode, the running variance for BatchNorm in eval mode and
the mean square for RMSNorm. Probes and the Lipschitz engine read these.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array

NORM_STATS = "norm_stats"


def _sow_stats(module: nn.Module, mean: Array, var: Array, sigma2: Array) -> None:
  """Records the statistics of this call (overwriting any earlier call's). Not during
  init (where every collection is mutable), so `init` returns no `norm_stats`."""
  if module.is_initializing() or not module.is_mutable_collection(NORM_STATS):
    return
  for name, value in (("mean", mean), ("var", var), ("sigma2", sigma2)):
    module.sow(NORM_STATS, name, value, init_fn=lambda: None, reduce_fn=lambda _, v: v)


class _AffineMixin:
  """`scale` (gamma) and `bias` (beta) per channel, each optional."""

  def _affine(self, y: Array, channels: int) -> Array:
    if self.use_scale:
      y = y * self.param("scale", self.scale_init, (channels,), self.param_dtype)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (channels,), self.param_dtype)
    return y


class Identity(nn.Module):
  """The `none` normalizer: returns its input (kept so every model has one code path)."""
  kind: str = "none"

  @nn.compact
  def __call__(self, x: Array, use_batch_stats: bool = True) -> Array:
    del use_batch_stats
    return x


class BatchNorm(_AffineMixin, nn.Module):
  """BatchNorm over all axes but the last.

  `use_batch_stats=True` (train mode) normalizes with this batch's statistics (over
  `axis_name` as well when set, i.e. over the global batch under pmap) and, when the
  `batch_stats` collection is mutable and the module is not initializing, updates the
  running statistics as `ra = momentum * ra + (1 - momentum) * batch_stat`.
  `use_batch_stats=False` (eval mode) is the affine map
  `gamma * (x - ra_mean) / sqrt(ra_var + eps) + beta`, whose Lipschitz constant is exactly
  `max_j |gamma_j| / sqrt(ra_var_j + eps)` (Lemma 1 with gamma = 1).
  """
  kind: str = "batch"
  epsilon: float = 1e-5
  momentum: float = 0.9
  axis_name: Optional[str] = None
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, use_batch_stats: bool = True) -> Array:
    c = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if not use_batch_stats:
      mean, var = ra_mean.value.astype(xf.dtype), ra_var.value.astype(xf.dtype)
      if self.is_mutable_collection(NORM_STATS):
        bm = jnp.mean(xf, axes)
        _sow_stats(self, bm, jnp.mean(jnp.square(xf - bm), axes), var)
    else:
      mean = jnp.mean(xf, axes)
      mean_sq = jnp.mean(jnp.square(xf), axes)
      if self.axis_name is not None and not self.is_initializing():
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
      # E[x^2] - E[x]^2 is what a cross-device reduction can sync in one pass; clamp the
      # tiny negative values cancellation can produce.
      var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
      _sow_stats(self, mean, var, var)
      if self.is_mutable_collection("batch_stats") and not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean.astype(jnp.float32)
        ra_var.value = m * ra_var.value + (1 - m) * var.astype(jnp.float32)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    return self._affine(y, c).astype(x.dtype)


class GroupNorm(_AffineMixin, nn.Module):
  """Per-sample normalization over groups of channels (and all spatial positions).

  Exactly one of `num_groups` / `group_size` is used: `group_size=1` is InstanceNorm,
  `num_groups=1` is LayerNorm over (positions x channels). With `num_groups=None` and
  `group_size=None` the layer picks the largest divisor of C that is <= 32.
  The local Jacobian norm at input u is at most `max|gamma| / sqrt(min_group var + eps)`.
  """
  kind: str = "group"
  num_groups: Optional[int] = None
  group_size: Optional[int] = None
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros
  param_dtype: Any = jnp.float32

  def groups_for(self, channels: int) -> int:
    """The number of groups used for `channels` channels; ValueError if impossible."""
    return resolve_num_groups(channels, self.num_groups, self.group_size)

  @nn.compact
  def __call__(self, x: Array, use_batch_stats: bool = True) -> Array:
    del use_batch_stats
    n, c = x.shape[0], x.shape[-1]
    g = self.groups_for(c)
    check_not_degenerate(self.kind, math.prod(x.shape[1:-1]) * (c // g), c, g)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    xg = xf.reshape(n, -1, g, c // g)          # [N, positions, G, C/G]
    mean = jnp.mean(xg, axis=(1, 3))            # [N, G]
    var = jnp.mean(jnp.square(xg - mean[:, None, :, None]), axis=(1, 3))
    _sow_stats(self, mean, var, var)
    y = (xg - mean[:, None, :, None]) * jax.lax.rsqrt(var + self.epsilon)[:, None, :, None]
    return self._affine(y.reshape(x.shape), c).astype(x.dtype)


class RMSNorm(_AffineMixin, nn.Module):
  """`gamma * u / sqrt(mean(u^2) + eps) + beta` per sample over all its features.

  No centering; the local Jacobian norm is at most `max|gamma| / sqrt(mean(u^2) + eps)`.
  """
  kind: str = "rms"
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = False
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, use_batch_stats: bool = True) -> Array:
    del use_batch_stats
    n, c = x.shape[0], x.shape[-1]
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(n, -1)
    ms = jnp.mean(jnp.square(xf), axis=1)
    if self.is_mutable_collection(NORM_STATS):
      mean = jnp.mean(xf, axis=1)
      _sow_stats(self, mean, jnp.mean(jnp.square(xf - mean[:, None]), axis=1), ms)
    y = (xf * jax.lax.rsqrt(ms + self.epsilon)[:, None]).reshape(x.shape)
    return self._affine(y, c).astype(x.dtype)


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def resolve_num_groups(channels: int, num_groups: Optional[int],
                       group_size: Optional[int], default_max: int = 32) -> int:
  """Number of channel groups for GroupNorm; ValueError naming the bad value otherwise."""
  if num_groups is not None and group_size is not None:
    raise ValueError(
        f"GroupNorm takes num_groups or group_size, not both (got num_groups={num_groups}, "
        f"group_size={group_size})")
  if group_size is not None:
    if group_size < 1 or channels % group_size:
      raise ValueError(
          f"GroupNorm group_size={group_size} does not divide {channels} channels; "
          f"allowed group sizes: {divisors(channels)}")
    return channels // group_size
  if num_groups is None:
    return max(d for d in divisors(channels) if d <= default_max)
  if num_groups < 1 or channels % num_groups:
    raise ValueError(
        f"GroupNorm num_groups={num_groups} does not divide {channels} channels; "
        f"allowed num_groups: {divisors(channels)}")
  return num_groups


def check_not_degenerate(kind: str, group_elements: int, channels: int,
                         num_groups: int) -> None:
  """ValueError when a per-sample centering normalizer (layer / group / instance) has
  groups of a single element: `u - mean(u)` is then 0, so the layer outputs its bias
  whatever the input and the network is constant. That happens on dense layers (no
  spatial positions) with one feature per group, e.g. instance norm, or GN with
  num_groups equal to the width."""
  if group_elements == 1:
    raise ValueError(
        f"{kind} normalizer over {channels} channel(s) in {num_groups} group(s): each group "
        "holds a single value (one feature, no spatial positions), so it has zero "
        "variance and the network output is constant; use fewer groups, or 'layer', "
        "'batch' or 'rms'")


def lipschitz_factor(scale: Optional[Array], sigma2: Array, epsilon: float) -> Array:
  """`max|gamma| / sqrt(min sigma2 + eps)`, the factor of docs/theory.md#normalizer-factor.

  Exact for BatchNorm in eval mode (sigma2 = running variance, per channel); an upper
  bound on the local Jacobian norm of LN/GN/IN/RMS at inputs whose group statistic is at
  least `min sigma2`. For BN, pass per-channel arrays and the max is over
  `|gamma_j| / sqrt(sigma2_j + eps)`, which is what the function computes.
  """
  sigma2 = jnp.asarray(sigma2)
  if scale is None:
    return jnp.max(jax.lax.rsqrt(sigma2 + epsilon))
  scale = jnp.abs(jnp.asarray(scale))
  if sigma2.shape == scale.shape:   # per-channel statistics (BatchNorm)
    return jnp.max(scale * jax.lax.rsqrt(sigma2 + epsilon))
  return jnp.max(scale) * jax.lax.rsqrt(jnp.min(sigma2) + epsilon)


__all__ = ["Identity", "BatchNorm", "GroupNorm", "RMSNorm", "NORM_STATS",
           "resolve_num_groups", "check_not_degenerate", "lipschitz_factor", "divisors"]
