"""Per-layer statistics of a model on a fixed probe batch, from one forward pass.

The statistics (docs/theory.md#layer-statistics; claims C4, C5, C7):

Linear layers (dense or conv), in forward order, l = 1..L:
  * `preact_var_{min,mean,median}`: variance of the layer's output z_l per output unit /
    channel over the probe batch (and all spatial positions), i.e. the grouping BatchNorm
    would use, summarized over the channels. Read with linen's `capture_intermediates`
    (a filter selecting exactly the Linear nodes' modules), so no second model definition.
  * `frobenius`: ||W_l||_F of the kernel array (for convs, of the kernel, not of the map).
  * `spectral`: ||W_l||_2, the exact operator norm of the whole linear map (for convs at
    the layer's input size) from `lipnorm.lipschitz.layer_operator_norms`.
  * `cumprod_spectral`, `cumprod_frobenius`: prod_{i <= l} of the norms above.

Normalizers (kind != "none"), in forward order, with `var` the population variance of
each normalization group of the normalizer's input and `sigma2` what it divided by
before `+ eps` (the statistics every normalizer sows into "norm_stats"):
  * groups: BN one per channel j (var, sigma2: `[C]`); LN/GN/IN one per
    (sample n, channel group g) (`[N, G]`, LN G = 1, IN G = C); RMS one per sample
    (`[N]`; sigma2 is the mean square).
  * `var_{min,mean,median}` over the groups; `sigma2_min`.
  * `factor`: `lipnorm.normalizers.lipschitz_factor(gamma, sigma2, eps)`, the normalizer
    factor of docs/theory.md#normalizer-factor (exact for eval-mode BN; an upper bound on the local
    Jacobian norm for LN/GN/IN/RMS on this batch).
  * `amplifying_fraction` (claim C7): the fraction of groups whose divisor is smaller
    than their gain, i.e. whose own factor exceeds 1:
      BN, channel j:                  sqrt(sigma2_j + eps) < |gamma_j|
      LN/GN/IN/RMS, sample n, group g: sqrt(sigma2_{n,g} + eps) < max_{j in g} |gamma_j|
    (group g holds channels g*C/G .. (g+1)*C/G - 1; LN and RMS one group of all C
    channels; gamma = 1 when the layer has no scale). `groups` is the number of groups.
  * `gamma_absmax`: max_j |gamma_j| (1 without scale).
  * `cumprod_var_mean`, `cumprod_var_min`, `cumprod_factor`: products over the first
    l normalizers (the normalized bound of docs/theory.md multiplies them).

BatchNorm mode: `use_batch_stats=False` (eval mode) normalizes with the running
statistics, so `sigma2` is the running variance while `var` is still the probe batch's
variance of the input; `use_batch_stats=True` runs BN on this batch's statistics
(as in training) without updating the running ones. Other normalizers ignore the mode.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lipnorm.normalizers import NORM_STATS, lipschitz_factor
from lipnorm.probes.layout import Path, ProbeLayout, probe_layout

Array = jax.Array
# Collections a probe pass writes; dropped from the variables it is given.
_PROBE_COLLECTIONS = (NORM_STATS, "intermediates")

LINEAR_STATS = ("preact_var_min", "preact_var_mean", "preact_var_median", "frobenius")
NORM_STATS_KEYS = ("var_min", "var_mean", "var_median", "sigma2_min", "factor",
                   "amplifying_fraction", "groups", "gamma_absmax")


def _lookup(tree: Mapping, path: Path, what: str) -> Any:
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"no {what} at path {'/'.join(path)!r}; is structure() in sync with "
                       f"the module names?")
    node = node[key]
  return node


def _summary(values: Array) -> tuple[Array, Array, Array]:
  v = values.reshape(-1)
  return jnp.min(v), jnp.mean(v), jnp.median(v)


def group_gains(scale: Optional[Array], num_groups: int, channels: int) -> Array:
  """max_{j in g} |gamma_j| for each of `num_groups` consecutive channel groups: `[G]`."""
  if scale is None:
    return jnp.ones((num_groups,), jnp.float32)
  return jnp.max(jnp.abs(scale).reshape(num_groups, channels // num_groups), axis=1)


def amplifying_mask(kind: str, scale: Optional[Array], sigma2: Array, eps: float,
                    channels: int) -> Array:
  """Boolean mask over the normalizer's groups: divisor sqrt(sigma2 + eps) < gain.

  BN: `sigma2` `[C]`, gain |gamma_j| per channel. Others: `sigma2` `[N, G]` (or `[N]`
  for RMS, one group), gain the max |gamma| over the group's channels. See the module
  docstring for the exact definition.
  """
  sigma = jnp.sqrt(sigma2 + eps)
  if kind == "batch":
    gain = jnp.ones_like(sigma) if scale is None else jnp.abs(scale)
    return sigma < gain
  s = sigma.reshape(sigma.shape[0], -1)            # [N, G]
  return s < group_gains(scale, s.shape[1], channels)[None, :]


def _norm_entry(kind: str, eps: float, stats: Mapping, params: Mapping) -> dict:
  var, sigma2 = stats["var"], stats["sigma2"]
  scale = params.get("scale") if isinstance(params, Mapping) else None
  channels = scale.shape[-1] if scale is not None else None
  if channels is None:   # no scale: any channel count gives gain 1
    channels = var.shape[-1] if kind == "batch" else 1
  mask = amplifying_mask(kind, scale, sigma2, eps, channels)
  vmin, vmean, vmed = _summary(var)
  return {
      "var_min": vmin, "var_mean": vmean, "var_median": vmed,
      "sigma2_min": jnp.min(sigma2),
      "factor": lipschitz_factor(scale, sigma2, eps),
      "amplifying_fraction": jnp.mean(mask.astype(jnp.float32)),
      "groups": jnp.asarray(mask.size, jnp.float32),
      "gamma_absmax": jnp.max(jnp.abs(scale)) if scale is not None else jnp.ones(()),
  }


def _stack(entries: list[dict], keys: Iterable[str]) -> dict[str, Array]:
  if not entries:
    return {k: jnp.zeros((0,), jnp.float32) for k in keys}
  return {k: jnp.stack([jnp.asarray(e[k], jnp.float32) for e in entries]) for k in keys}


def make_probe_fn(model: nn.Module, layout: Optional[ProbeLayout] = None, *,
                  use_batch_stats: bool = False) -> Callable[[Any, Array], dict]:
  """A jit-compiled `probe(variables, x) -> pytree` for `model` (built once; reuse it).

  The pytree is `{"linear": {k: [L]} for k in LINEAR_STATS, "norm": {k: [K]} for k in
  NORM_STATS_KEYS}`, layers in `layout` order. `x` is the probe batch `[N, ...]`;
  `variables` the model's variables (any "norm_stats" / "intermediates" are ignored).
  Everything comes from one `model.apply` with `train=False` (no dropout) and BN in eval
  mode, or on batch statistics when `use_batch_stats` (running stats untouched).
  """
  layout = layout or probe_layout(model.structure())
  linear_set = frozenset(layout.linear_paths)

  def capture(module: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and tuple(module.path) in linear_set

  def probe(variables, x):
    variables = {k: v for k, v in variables.items() if k not in _PROBE_COLLECTIONS}
    _, state = model.apply(variables, x, train=False, use_batch_stats=use_batch_stats,
                           mutable=list(_PROBE_COLLECTIONS), capture_intermediates=capture)
    params = variables["params"]
    linear = []
    for path in layout.linear_paths:
      z = _lookup(state["intermediates"], path, "captured output")["__call__"][0]
      z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
      vmin, vmean, vmed = _summary(jnp.var(z, axis=0))
      kernel = _lookup(params, path, "parameters")["kernel"]
      linear.append({"preact_var_min": vmin, "preact_var_mean": vmean,
                     "preact_var_median": vmed,
                     "frobenius": jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32))))})
    norms = []
    for path, kind, eps in zip(layout.norm_paths, layout.norm_kinds, layout.norm_eps):
      stats = _lookup(state.get(NORM_STATS, {}), path, "sown normalizer statistics")
      norm_params = _lookup(params, path, "parameters") if _has(params, path) else {}
      norms.append(_norm_entry(kind, eps, stats, norm_params))
    return {"linear": _stack(linear, LINEAR_STATS), "norm": _stack(norms, NORM_STATS_KEYS)}

  return jax.jit(probe)


def _has(tree: Mapping, path: Path) -> bool:
  try:
    _lookup(tree, path, "")
    return True
  except ValueError:
    return False


def _cumprod(values: np.ndarray) -> np.ndarray:
  # float64 products: 10+ layers of norms ~3 overflow nothing, but keep precision.
  return np.cumprod(np.asarray(values, np.float64))


@dataclasses.dataclass(frozen=True)
class LayerProbes:
  """The probe statistics of one BN mode, as float64 NumPy arrays, layers in order.

  `linear[k]` is `[L]` for k in LINEAR_STATS (+ "spectral", "cumprod_spectral",
  "cumprod_frobenius" when spectral norms were computed or "cumprod_frobenius" always);
  `norm[k]` is `[K]` for k in NORM_STATS_KEYS + "cumprod_var_mean", "cumprod_var_min",
  "cumprod_factor".
  """
  mode: str
  layout: ProbeLayout
  linear: dict[str, np.ndarray]
  norm: dict[str, np.ndarray]


def assemble(mode: str, layout: ProbeLayout, raw: Mapping,
             spectral: Optional[np.ndarray] = None) -> LayerProbes:
  """Converts the jitted core's pytree to NumPy and adds the cumulative products."""
  linear = {k: np.asarray(v, np.float64) for k, v in raw["linear"].items()}
  norm = {k: np.asarray(v, np.float64) for k, v in raw["norm"].items()}
  linear["cumprod_frobenius"] = _cumprod(linear["frobenius"])
  if spectral is not None:
    linear["spectral"] = np.asarray(spectral, np.float64)
    linear["cumprod_spectral"] = _cumprod(spectral)
  norm["cumprod_var_mean"] = _cumprod(norm["var_mean"])
  norm["cumprod_var_min"] = _cumprod(norm["var_min"])
  norm["cumprod_factor"] = _cumprod(norm["factor"])
  return LayerProbes(mode, layout, linear, norm)
