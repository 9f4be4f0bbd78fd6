"""`LayerProber`: the per-layer statistics of `layer_stats` plus exact weight operator
norms, for one or both BatchNorm modes, and their flattening to loggable values."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import linen as nn

from lipnorm.bn_modes import EVAL, FORWARD_BN_MODES, uses_batch_stats
from lipnorm.probes.layer_stats import LayerProbes, assemble, make_probe_fn
from lipnorm.probes.layout import ProbeLayout, probe_layout


def weight_operator_norms(model: nn.Module, variables: Any, input_shape: Sequence[int], *,
                          start_vectors: Optional[Mapping] = None) -> dict:
  """`lipnorm.lipschitz.layer_operator_norms` of every linear map: `{path:
  OperatorNorm}` (exact SVD for dense maps, operator norm of the whole conv map at its
  input size; `start_vectors` warm-starts large convs' Lanczos estimates)."""
  from lipnorm.lipschitz import layer_operator_norms
  return layer_operator_norms(model, variables, input_shape=tuple(input_shape),
                              start_vectors=start_vectors)


def weight_spectral_norms(model: nn.Module, variables: Any, layout: ProbeLayout,
                          input_shape: Sequence[int], *,
                          start_vectors: Optional[Mapping] = None) -> np.ndarray:
  """||W_l||_2 of every linear map in `layout` order: `[L]` (`weight_operator_norms`)."""
  norms = weight_operator_norms(model, variables, input_shape, start_vectors=start_vectors)
  return _estimates(norms, layout)


def _estimates(norms: Mapping, layout: ProbeLayout) -> np.ndarray:
  return np.array([float(norms[p].estimate) for p in layout.linear_paths], np.float64)


class LayerProber:
  """Probes a fixed model on batches; the jitted cores are built once per BN mode.

  Args:
    model: a zoo model (anything with `structure()` and the `apply` contract).
    bn_modes: subset of `FORWARD_BN_MODES` ("eval", "batch"); "batch" is only run when
      the model has a BatchNorm (for every other normalizer both modes are the same
      computation).
    spectral: also compute each weight's exact operator norm (costs one call into the
      Lipschitz engine per probe; weights do not depend on the BN mode).
  """

  def __init__(self, model: nn.Module, *, bn_modes: Sequence[str] = ("eval",),
               spectral: bool = True):
    bad = [m for m in bn_modes if m not in FORWARD_BN_MODES]
    if bad or not bn_modes:
      raise ValueError(f"bn_modes={list(bn_modes)!r}; allowed: a non-empty subset of "
                       f"{list(FORWARD_BN_MODES)}")
    self.model = model
    self.layout = probe_layout(model.structure())
    has_bn = "batch" in self.layout.norm_kinds
    self.bn_modes = tuple(m for m in dict.fromkeys(bn_modes) if m == EVAL or has_bn)
    if not self.bn_modes:   # asked only for "batch" on a model without BN: same as eval
      self.bn_modes = (EVAL,)
    self.spectral = spectral
    self._fns = {m: make_probe_fn(model, self.layout, use_batch_stats=uses_batch_stats(m))
                 for m in self.bn_modes}
    # {input shape: {path: top right singular vector}} of the last spectral probe: the
    # next probe's Lanczos (large convs) starts there, as weights change slowly
    self._start_vectors: dict[tuple, dict] = {}

  def __call__(self, variables: Any, x: jax.Array, *, spectral: bool | None = None
               ) -> dict[str, LayerProbes]:
    """{mode: LayerProbes} on probe batch `x` `[N, ...]`; `spectral` overrides the
    constructor's choice for this call. Spectral norms of large convs (Lanczos) start
    from the previous call's singular vectors at the same input shape."""
    spectral = self.spectral if spectral is None else spectral
    values = None
    if spectral:
      shape = tuple(x.shape[1:])
      norms = weight_operator_norms(self.model, variables, shape,
                                    start_vectors=self._start_vectors.get(shape))
      self._start_vectors[shape] = {p: r.vector for p, r in norms.items()
                                    if r.vector is not None}
      values = _estimates(norms, self.layout)
    return {m: assemble(m, self.layout, fn(variables, x), values)
            for m, fn in self._fns.items()}


def _floats(a: np.ndarray) -> list[float]:
  return [float(v) for v in np.asarray(a).reshape(-1)]


def flatten_probes(probes: Mapping[str, LayerProbes]) -> dict[str, float | list[float]]:
  """Loggable values: per-layer lists (forward order) and scalars.

  Keys: `weight_{spectral,frobenius}` and `weight_cumprod_{spectral,frobenius}` (lists
  over linear layers) with `weight_{spectral,frobenius}_product`; per BN mode m:
  `m/preact_var_{min,mean,median}` (lists over linear layers), `m/norm_<stat>` (lists
  over normalizers, for every NORM_STATS_KEYS entry and the cumprods),
  `m/norm_factor_product`, `m/norm_var_mean_product` and `m/amplifying_fraction` (all
  amplifying groups / all groups of all normalizers).
  """
  out: dict[str, float | list[float]] = {}
  first = next(iter(probes.values()))
  for name in ("spectral", "frobenius"):
    if name in first.linear:
      out[f"weight_{name}"] = _floats(first.linear[name])
      out[f"weight_cumprod_{name}"] = _floats(first.linear[f"cumprod_{name}"])
      out[f"weight_{name}_product"] = float(np.prod(first.linear[name]))
  for mode, p in probes.items():
    for stat in ("preact_var_min", "preact_var_mean", "preact_var_median"):
      out[f"{mode}/{stat}"] = _floats(p.linear[stat])
    for stat, values in p.norm.items():
      if stat != "groups":
        out[f"{mode}/norm_{stat}"] = _floats(values)
    if p.layout.num_norm:
      groups = p.norm["groups"]
      out[f"{mode}/norm_factor_product"] = float(np.prod(p.norm["factor"]))
      out[f"{mode}/norm_var_mean_product"] = float(np.prod(p.norm["var_mean"]))
      out[f"{mode}/amplifying_fraction"] = float(
          np.sum(p.norm["amplifying_fraction"] * groups) / np.sum(groups))
  return out
