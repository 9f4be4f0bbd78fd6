"""Sound upper bounds on a network's Lipschitz constant, composed from `model.structure()`.

`upper_bound` walks the structure in forward order and gives every node a factor:

  * Linear: the certified `upper` of its exact operator norm (`operator_norms`).
  * Activation: its global Lipschitz constant (`lipschitz` field).
  * Pool: avg / global avg (linear, exact norms), max (sqrt(max window overlap)).
  * Flatten: 1.
  * Norm (docs/theory.md#normalizer-factor, `lipnorm.normalizers.lipschitz_factor`):
      - BN, bn_mode="eval": exactly `max_j |gamma_j| / sqrt(running_var_j + eps)`.
      - BN, bn_mode="batch_fixed": the affine map with this batch's statistics, from
        `stats` measured on that batch (`normalizer_stats(..., bn_mode="batch_fixed")`);
        valid only for those statistics. Without stats: no bound.
      - BN, bn_mode="batch_coupled": no sound bound (the output of one example depends
        on the others through the statistics).
      - LN / GN / IN / RMS: `max|gamma| / sqrt(min sigma^2 + eps)`, the minimum of the
        normalizer's input statistic (variance; mean square for RMS) over the data in
        `stats`. This bounds the normalizer's Jacobian norm at every input whose
        statistic is at least that minimum, so the total bounds `||J_x f(x)||_2` at such
        inputs (scope "data": e.g. the data the stats came from); it is not a global
        Lipschitz constant (the variance can approach 0 between data points). Without
        stats: no bound.
  * Sequential: product; Residual: `Lip(shortcut) + Lip(branch)` (identity shortcut: 1).
  * Unbounded: no sound bound (its `reason`); inner layers are still reported.

Totals: `product_bound` is the unnormalized product (normalizers counted as 1; all
other factors and the residual rule as above), `normalized_bound` includes the
normalizer factors and is the sound bound on the model itself (in `scope`);
`estimate` composes the per-node best estimates the same way (not certified). Where a
factor has no sound value the totals are `inf`, `sound` is False and `reasons` says why.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipnorm.lipschitz import certified, model_info
from lipnorm.lipschitz.operator_norms import (DEFAULT_EXACT_MAX_DIM, F64_MARGIN, ConvGeometry,
                                              OperatorNorm, conv_operator_norm,
                                              dense_operator_norm, linear_operator_norm,
                                              pool_operator_norm)
from lipnorm.models import structure as st

Path = tuple[str, ...]
INF = float("inf")
NAN = float("nan")
PER_SAMPLE_NORMS = ("layer", "group", "instance", "rms")


@dataclasses.dataclass(frozen=True)
class BoundEntry:
  """One node's contribution. `upper`: the sound factor used in `paper_bound` (inf:
  none); `product_factor`: the factor used in `product_bound` (1 for normalizers);
  `certified`: the factor used in the folded product behind `certified_bound` (a
  normalizer's per-channel part folded into a kernel counts there, not here);
  `estimate`: best estimate of the factor (exact where `exact`)."""
  path: Path
  kind: str
  estimate: float
  upper: float
  product_factor: float
  exact: bool
  notes: str = ""
  input_shape: tuple = ()
  certified: float = INF


@dataclasses.dataclass(frozen=True)
class NormFlag:
  """A near-degenerate normalizer: its (minimum) input variance `sigma2` is below
  `threshold`, so its factor is dominated by eps and the bound is fragile there."""
  path: Path
  kind: str
  sigma2: float
  threshold: float


@dataclasses.dataclass(frozen=True)
class BoundReport:
  """The structured result of `upper_bound` (module docstring).

  paper_bound: the paper's bound, the product of layer norms and per-normalizer
    factors (`max|gamma| / sigma`), residual rule as above.
  certified_bound: lipnorm's tightest certified bound (`lipschitz.certified`): the
    smaller of `folded_bound` (normalizer diagonals folded into kernels) and
    `chain_bound` (slope-set dynamic program; inf where the model is not a chain of
    explicit maps). Never above `paper_bound`.
  product_bound: the unnormalized product (normalizers counted as 1).
  scope: where both bounds hold: "global", "data" (LN/GN/IN/RMS: inputs whose
    normalizer statistics are at least the measured minima), "batch" (BN batch_fixed)
    or "none" (no sound bound).
  flags: near-degenerate normalizers (`NormFlag`).
  """
  entries: tuple
  paper_bound: float
  certified_bound: float
  product_bound: float
  estimate: float
  sound: bool
  scope: str
  reasons: tuple
  bn_mode: str
  input_shape: tuple
  folded_bound: float = INF
  chain_bound: float = INF
  certified_method: str = ""
  flags: tuple = ()

  @property
  def normalized_bound(self) -> float:
    """The paper's bound (the name used before `paper_bound`)."""
    return self.paper_bound

  def norm_factor_product(self) -> float:
    """Product of the normalizer factors (meaningful for sequential models, where
    `paper_bound == product_bound * norm_factor_product()`)."""
    return math.prod(e.upper for e in self.entries if e.kind.startswith("norm:"))

  def table(self) -> str:
    """A plain-text table of the entries and totals."""
    lines = [f"{'path':32s} {'kind':18s} {'estimate':>12s} {'upper':>12s} {'folded':>12s}"
             "  notes"]
    for e in self.entries:
      lines.append(f"{'/'.join(e.path) or '-':32s} {e.kind:18s} {e.estimate:12.6g} "
                   f"{e.upper:12.6g} {e.certified:12.6g}  {e.notes}")
    lines.append(f"product_bound (unnormalized) = {self.product_bound:.6g}")
    lines.append(f"paper_bound = {self.paper_bound:.6g}  (sound={self.sound}, "
                 f"scope={self.scope})")
    lines.append(f"certified_bound = {self.certified_bound:.6g}  ({self.certified_method}; "
                 f"folded {self.folded_bound:.6g}, chain {self.chain_bound:.6g})")
    lines.append(f"estimate (uncertified) = {self.estimate:.6g}")
    lines.extend(f"note: {r}" for r in self.reasons)
    lines.extend(f"flag: {'/'.join(f.path)} ({f.kind}) input variance {f.sigma2:.3g} < "
                 f"{f.threshold:.3g}: near-degenerate" for f in self.flags)
    return "\n".join(lines)


# ------------------------------------------------------------------------- statistics

@functools.partial(jax.jit, static_argnames=("model", "eval_mode"))
def _sown_norm_stats(model, variables, xs, *, eval_mode: bool):
  """The `norm_stats` collection of one forward pass (eval mode, or batch statistics);
  compiled once per model, mode and input shape (jit's cache, keyed on the model)."""
  kwargs = {"train": False} if eval_mode else {"use_batch_stats": True}
  return model.apply(variables, xs, mutable=["norm_stats"], **kwargs)[1]


def normalizer_stats(model, variables: Mapping, xs: jax.Array, *, bn_mode: str = "eval",
                     batch_size: Optional[int] = None) -> dict[Path, np.ndarray]:
  """Measured input statistics of every normalizer for `upper_bound(stats=...)`.

  For LN / GN / IN / RMS: the minimum over `xs` (and groups) of the statistic each
  divides by (`sigma2` of the `norm_stats` collection: variance, mean square for RMS),
  a scalar. For BN with bn_mode "batch_fixed": this batch's per-channel variance `[C]`
  (one pass over all of `xs`, no chunking). BN in "eval" needs no stats (running var).
  `batch_size` chunks the forward passes (per-sample statistics only).
  """
  model_info.check_bn_mode(bn_mode)
  node = model_info.structure_of(model)
  if node is None:
    raise ValueError(f"{type(model).__name__} has no structure()")
  xs = jnp.asarray(xs)
  model_info.check_batch(model, variables, xs)
  norms = st.norm_layers(node)
  eval_mode = bn_mode == "eval"

  def apply(v, x):
    return _sown_norm_stats(model, v, x, eval_mode=eval_mode)
  has_batch = any(n.kind == "batch" for n in norms)
  step = xs.shape[0] if (batch_size is None or (has_batch and bn_mode != "eval")) \
      else batch_size
  out: dict[Path, np.ndarray] = {}
  for start in range(0, xs.shape[0], step):
    sown = apply(variables, xs[start:start + step]).get("norm_stats", {})
    for n in norms:
      if n.kind == "batch" and bn_mode == "eval":
        continue
      s = model_info.get_at(sown, n.path)
      if s is None or "sigma2" not in s:
        raise ValueError(f"normalizer {'/'.join(n.path)} sowed no 'sigma2' into norm_stats")
      val = np.asarray(s["sigma2"], np.float64)
      val = val if n.kind == "batch" else np.asarray(val.min())
      out[n.path] = val if n.path not in out else np.minimum(out[n.path], val)
  return out


def merge_stats(*stats: Mapping[Path, np.ndarray]) -> dict[Path, np.ndarray]:
  """Elementwise minimum of several `normalizer_stats` results (the bound then holds on
  the union of the data they were measured on)."""
  out: dict[Path, np.ndarray] = {}
  for s in stats:
    for k, v in s.items():
      out[k] = np.asarray(v) if k not in out else np.minimum(out[k], v)
  return out


# ----------------------------------------------------------------------------- factors

def normalizer_factor(scale, sigma2, epsilon: float) -> float:
  """`lipnorm.normalizers.lipschitz_factor` evaluated in float64 NumPy (bounds must not
  lose digits to float32): `max_j |gamma_j| / sqrt(sigma2_j + eps)` for per-channel
  `sigma2` (BN), else `max|gamma| / sqrt(min sigma2 + eps)`; `scale=None`: gamma = 1."""
  sigma2 = np.asarray(sigma2, np.float64)
  if scale is None:
    return float(np.max(1.0 / np.sqrt(sigma2 + epsilon)))
  scale = np.abs(np.asarray(scale, np.float64))
  if sigma2.shape == scale.shape:
    return float(np.max(scale / np.sqrt(sigma2 + epsilon)))
  return float(np.max(scale) / np.sqrt(np.min(sigma2) + epsilon))


def _norm_factor(node: st.Norm, variables: Mapping, bn_mode: str,
                 stats: Optional[Mapping]) -> tuple[float, bool, str, Optional[str]]:
  """(factor, exact, notes, scope-or-None-if-unbounded) of one normalizer."""
  name = "/".join(node.path)
  if node.kind == "none":
    return 1.0, True, "identity", "global"
  params = model_info.get_at(variables.get("params", {}), node.path) or {}

  def factor(sigma2):
    return normalizer_factor(params.get("scale"), sigma2, node.epsilon)

  if node.kind == "batch":
    if bn_mode == "eval":
      var = model_info.get_at(variables.get("batch_stats", {}), node.path + ("var",))
      if var is None:
        raise ValueError(f"BatchNorm {name}: no batch_stats['{name}']['var'] in variables")
      return factor(var) * (1 + F64_MARGIN), True, \
          "BN eval: max|gamma|/sqrt(running_var+eps), exact", "global"
    if bn_mode == "batch_coupled":
      return INF, False, "BN differentiated through batch statistics: no sound bound", None
    if stats is None or node.path not in stats:
      return INF, False, ("BN batch_fixed needs this batch's variances: pass "
                          "stats=normalizer_stats(..., bn_mode='batch_fixed')"), None
    return factor(stats[node.path]) * (1 + F64_MARGIN), True, \
        "BN with this batch's statistics held fixed", "batch"
  if node.kind in PER_SAMPLE_NORMS:
    if stats is None or node.path not in stats:
      return INF, False, (f"{node.kind} norm needs the measured minimum input variance: "
                          "pass stats=normalizer_stats(model, variables, xs)"), None
    sigma2 = float(np.min(stats[node.path]))
    return factor(sigma2) * (1 + F64_MARGIN), False, \
        f"max|gamma|/sqrt(min sigma2 + eps), min sigma2 = {sigma2:.4g} over the data", "data"
  return INF, False, f"unknown normalizer kind {node.kind!r}: no bound", None


# ------------------------------------------------------------------------ composition

def _common_prefix(paths: Sequence[Path]) -> Path:
  paths = [p for p in paths if p]
  if not paths:
    return ()
  out = []
  for parts in zip(*paths):
    if len(set(parts)) != 1:
      break
    out.append(parts[0])
  return tuple(out)


def _pool_out_shape(pool: st.Pool, shape: tuple) -> tuple:
  if pool.kind == "global_avg":
    return (shape[-1],)
  h, w, c = shape
  window = tuple(pool.window)
  geom = ConvGeometry.make((h, w), window, tuple(pool.strides) or window, pool.padding)
  return (*geom.out_hw, c)


def _mul(a: float, b: float) -> float:
  """Product of Lipschitz factors with 0 * inf = 0 (a zero map makes the rest constant)."""
  return 0.0 if a == 0 or b == 0 else a * b


class _Composer:
  """Walks the structure, appending entries and returning (product, paper, estimate,
  folded, output shape) for each subtree (`folded`: `certified.py`, part 1)."""

  def __init__(self, variables, calls, bn_mode, stats, conv_kwargs, degenerate_var,
               paper=True):
    self.paper = paper
    self.variables, self.calls = variables, calls
    self.bn_mode, self.stats, self.conv_kwargs = bn_mode, stats, conv_kwargs
    self.degenerate_var = degenerate_var
    self.entries: list[BoundEntry] = []
    self.reasons: list[str] = []
    self.scopes: set[str] = set()
    self.flags: list[NormFlag] = []

  def add(self, path, kind, est, upper, prod, exact, notes, shape, cert):
    self.entries.append(BoundEntry(tuple(path), kind, float(est), float(upper), float(prod),
                                   bool(exact), notes, tuple(shape), float(cert)))

  def walk(self, node, shape: tuple):
    if isinstance(node, st.Sequential):
      return self._walk_sequential(node.layers, shape)
    if isinstance(node, st.Linear):
      return self._walk_linear(node, shape, None, None)
    if isinstance(node, st.Norm):
      return self._walk_norm(node, shape, folded_back=False, forward=False)[:5]
    if isinstance(node, st.Activation):
      lip = node.lipschitz
      self.add((), f"activation:{node.name}", lip, lip, lip, True,
               "global Lipschitz constant", shape, lip)
      return lip, lip, lip, lip, shape
    if isinstance(node, st.Flatten):
      self.add((), "flatten", 1.0, 1.0, 1.0, True, "isometry", shape, 1.0)
      return 1.0, 1.0, 1.0, 1.0, (math.prod(shape),)
    if isinstance(node, st.Pool):
      if len(shape) != 3:
        raise ValueError(f"pool {node} needs an [H, W, C] input, got shape {shape}")
      op = pool_operator_norm(node, shape, **self.conv_kwargs)
      self.add((), op.kind, op.estimate, op.upper, op.upper, op.exact, op.notes, shape,
               op.upper)
      est = op.estimate if math.isfinite(op.estimate) else op.upper
      return op.upper, op.upper, est, op.upper, _pool_out_shape(node, shape)
    if isinstance(node, st.Residual):
      start = len(self.entries)
      if node.shortcut is None:
        sp = sn = se = sc = 1.0
      else:
        sp, sn, se, sc, _ = self.walk(node.shortcut, shape)
      bp, bn, be, bc, out_shape = self.walk(node.branch, shape)
      path = _common_prefix([e.path for e in self.entries[start:]])
      self.add(path, "residual", se + be, sn + bn, sp + bp, False,
               f"Lip(shortcut) + Lip(branch) = {sn:.4g} + {bn:.4g} (folded: {sc:.4g} + "
               f"{bc:.4g})", shape, sc + bc)
      return sp + bp, sn + bn, se + be, sc + bc, out_shape
    if isinstance(node, st.Unbounded):
      if node.inner is not None:   # per-layer numbers only; gating keeps the input shape
        self.walk(node.inner, shape)
      self.reasons.append(f"{'/'.join(node.path) or 'block'}: {node.reason}")
      self.add(node.path, "unbounded", INF, INF, INF, False, node.reason, shape, INF)
      return INF, INF, INF, INF, shape
    raise ValueError(f"unknown structure node {node!r}")

  def _walk_sequential(self, layers: Sequence, shape: tuple):
    """Products of the children; per-channel normalizer diagonals are folded into the
    neighbouring kernels for the folded product (certified.py, part 1)."""
    prod = paper = est = folded = 1.0
    pending = None            # a diagonal waiting for the next Linear's input channels
    folded_back = None        # path of a BN folded into the Linear just walked
    for idx, child in enumerate(layers):
      flush = None
      if isinstance(child, st.Linear):
        nxt = layers[idx + 1] if idx + 1 < len(layers) else None
        out_scale = None
        if isinstance(nxt, st.Norm) and nxt.kind == "batch":
          out_scale = certified.norm_channel_scale(nxt, self.variables, self.bn_mode,
                                                   self.stats)
        p, n, e, c, shape = self._walk_linear(child, shape, pending, out_scale)
        pending, folded_back = None, (nxt.path if out_scale is not None else None)
      elif isinstance(child, st.Norm):
        if pending is not None:
          flush, pending = pending, None
        forward = any(isinstance(x, st.Linear) for x in _until_blocked(layers[idx + 1:]))
        p, n, e, c, shape, pending = self._walk_norm(
            child, shape, folded_back=child.path == folded_back, forward=forward)
      elif certified.folds_forward(child) and pending is not None:
        in_shape = shape
        p, n, e, c, shape = self.walk(child, shape)
        if isinstance(child, st.Flatten):
          pending = certified.tile_scale(pending, math.prod(in_shape))
      else:
        if pending is not None:
          flush, pending = pending, None
        p, n, e, c, shape = self.walk(child, shape)
      if flush is not None:
        folded = _mul(folded, float(np.max(np.abs(flush))) * (1 + F64_MARGIN))
      prod, paper, est, folded = _mul(prod, p), _mul(paper, n), _mul(est, e), _mul(folded, c)
    if pending is not None:
      folded = _mul(folded, float(np.max(np.abs(pending))) * (1 + F64_MARGIN))
    return prod, paper, est, folded, shape

  def _walk_linear(self, node: st.Linear, shape, in_scale, out_scale):
    call = self.calls.get(node.path)
    if call is None:
      raise ValueError(f"Linear node {'/'.join(node.path)} was never called by the model")
    params = self.variables["params"]
    folds = in_scale is not None or out_scale is not None
    if folds:
      kernel = model_info.get_at(params, node.path)["kernel"]
      k = certified.fold_kernel(kernel, node.kind, in_scale, out_scale,
                                node.feature_group_count)
      kw = dict(self.conv_kwargs, estimate=False)
      fold_op = linear_operator_norm(node, _with_kernel(params, node.path, k), call, **kw)
      cert = fold_op.upper
      how = ("; folded " + " and ".join(
          w for w, s in (("input gains", in_scale), ("BN output diagonal", out_scale))
          if s is not None) + f": {cert:.6g}")
    if folds and not self.paper:   # the folded kernel only: half the conv work
      op = dataclasses.replace(fold_op, estimate=NAN, upper=NAN, exact=False,
                               notes="paper factor skipped (paper=False)")
    else:
      op = linear_operator_norm(node, params, call, **self.conv_kwargs)
    if not folds:
      cert, how = op.upper, ""
    self.add(node.path, node.kind, op.estimate, op.upper, op.upper, op.exact,
             f"{op.method}; {op.notes}{how}", op.input_shape, cert)
    out_shape = self._out_shape(node, call, op)
    est = op.estimate if math.isfinite(op.estimate) else op.upper
    return op.upper, op.upper, est, cert, out_shape

  def _walk_norm(self, node: st.Norm, shape, *, folded_back: bool, forward: bool):
    """(product 1, paper factor, estimate, folded factor, shape, diagonal to fold into
    the next Linear or None)."""
    call = self.calls.get(node.path)
    if call is not None:
      shape = tuple(call.in_shape[1:])
    f, exact, notes, scope = _norm_factor(node, self.variables, self.bn_mode, self.stats)
    if scope is None:
      self.reasons.append(f"{'/'.join(node.path)}: {notes}")
    else:
      self.scopes.add(scope)
    self._flag(node)
    cert, pending = f, None
    if math.isfinite(f) and node.kind != "none":
      scale = certified.norm_channel_scale(node, self.variables, self.bn_mode, self.stats)
      if node.kind == "batch":
        if folded_back:
          cert, notes = 1.0, notes + "; folded into the preceding kernel"
        elif forward and scale is not None:
          cert, pending = 1.0, scale
          notes += "; folded into the next kernel"
      elif scale is not None:   # LN/GN/IN/RMS: 1/sigma stays, gamma moves
        sigma2 = float(np.min(self.stats[node.path]))
        if forward:
          cert, pending = (1 + F64_MARGIN) / math.sqrt(sigma2 + node.epsilon), scale
          notes += "; gamma folded into the next kernel"
    self.add(node.path, f"norm:{node.kind}", f, f, 1.0, exact, notes, shape, cert)
    return 1.0, f, f, cert, shape, pending

  def _flag(self, node: st.Norm):
    if node.kind in PER_SAMPLE_NORMS and self.stats is not None and node.path in self.stats:
      sigma2 = float(np.min(self.stats[node.path]))
    elif node.kind == "batch" and self.bn_mode == "eval":
      var = model_info.get_at(self.variables.get("batch_stats", {}), node.path + ("var",))
      sigma2 = INF if var is None else float(np.min(np.asarray(var)))
    elif node.kind == "batch" and self.stats is not None and node.path in self.stats:
      sigma2 = float(np.min(self.stats[node.path]))
    else:
      return
    if sigma2 < self.degenerate_var:
      self.flags.append(NormFlag(node.path, node.kind, sigma2, self.degenerate_var))

  def _out_shape(self, node: st.Linear, call, op: OperatorNorm) -> tuple:
    kernel = model_info.get_at(self.variables["params"], node.path)["kernel"]
    if node.kind == "dense":
      return (*op.input_shape[:-1], kernel.shape[-1])
    geom = ConvGeometry.make(op.input_shape[:2], kernel.shape[:2], node.strides,
                             node.padding)
    return (*geom.out_hw, kernel.shape[-1])


def _with_kernel(params: Mapping, path: Path, kernel) -> dict:
  """`params` with the kernel at `path` replaced (the other leaves shared)."""
  if not path:
    return {**params, "kernel": kernel}
  return {**params, path[0]: _with_kernel(params[path[0]], path[1:], kernel)}


def _until_blocked(layers: Sequence) -> list:
  """The leading nodes a per-channel diagonal can travel through, plus the node that
  stops it (a Linear consumes it; anything else blocks it)."""
  out = []
  for layer in layers:
    out.append(layer)
    if not certified.folds_forward(layer):
      break
  return out


DEFAULT_DEGENERATE_VAR = 1e-4


def upper_bound(model, variables: Mapping, *, input_shape: Sequence[int],
                stats: Optional[Mapping] = None, bn_mode: str = "eval",
                estimate_convs: bool = True, tol: float = 1e-6, num_iters: int = 100,
                exact_max_dim: int = DEFAULT_EXACT_MAX_DIM, seed: int = 0,
                chain_max_dim: int = certified.DEFAULT_CHAIN_MAX_DIM,
                degenerate_var: float = DEFAULT_DEGENERATE_VAR,
                paper: bool = True) -> BoundReport:
  """The bound report of `model` for one example of shape `input_shape` (no batch axis).

  Args:
    stats: `normalizer_stats(...)` output (min input variances) for LN/GN/IN/RMS and
      for BN in "batch_fixed"; merge several with `merge_stats`.
    bn_mode: "eval" (default), "batch_fixed" or "batch_coupled" (module docstring).
    estimate_convs, tol, num_iters, exact_max_dim, seed: for conv / avg-pool operator
      norms (`operator_norms.conv_operator_norm`); the certified `upper` never depends
      on the Lanczos estimate.
    chain_max_dim: the chain bound (`certified.ChainBound`) runs when the model is a
      sequential chain whose maps have at most this many inputs / outputs (0: never).
    degenerate_var: normalizers whose (minimum) input variance is below this are listed
      in `flags`.
    paper: False skips the unfolded norms of the kernels a normalizer folds into (about
      half the conv work of a BN ResNet): `paper_bound`, `product_bound`, `estimate`
      and those entries' `upper` are then NaN; `certified_bound` is unchanged.

  Raises NonFiniteError when `variables` hold NaN or inf.
  """
  model_info.check_bn_mode(bn_mode)
  node = model_info.structure_of(model)
  if node is None:
    raise ValueError(f"{type(model).__name__} has no structure(); see lipnorm.models.structure")
  model_info.check_finite_variables(variables)
  input_shape = tuple(int(d) for d in input_shape)
  calls = model_info.module_calls(model, variables, input_shape)
  comp = _Composer(variables, calls, bn_mode, stats,
                   dict(estimate=estimate_convs, tol=tol, num_iters=num_iters,
                        exact_max_dim=exact_max_dim, seed=seed), degenerate_var, paper)
  prod, paper_value, est, folded, _ = comp.walk(node, input_shape)
  if not paper:
    prod = paper_value = est = NAN
  sound = math.isfinite(paper_value) if paper else math.isfinite(folded)
  if sound:
    scope = "data" if "data" in comp.scopes else ("batch" if "batch" in comp.scopes
                                                  else "global")
  else:
    scope = "none"
  reasons = list(comp.reasons)
  if scope == "data":
    reasons.append("LN/GN/IN/RMS factors use the measured minimum input variance: the bound "
                   "holds for ||J_x f(x)||_2 at inputs whose normalizer input statistics "
                   "are at least those minima (e.g. the data measured), not globally")
  if scope == "batch":
    reasons.append("BN factors use this batch's statistics held fixed (bn_mode "
                   "'batch_fixed'); valid for those statistics only")
  chain_value, chain_note = INF, "not a chain"
  if sound and chain_max_dim > 0:
    try:
      chain = certified.build_chain(node, variables, calls, input_shape, bn_mode, stats,
                                    chain_max_dim)
      chain_value, chain_note = min(chain.bound(), chain.eclipse_bound()), ""
    except certified.NotAChain as e:
      chain_note = str(e)
  folded = (min(folded, paper_value) if paper else folded) if sound else INF
  cert = min(folded, chain_value)
  method = ("chain (slope-set dynamic program)" if chain_value < folded else
            "folded product" + (f"; chain bound unavailable: {chain_note}" if chain_note
                                else ""))
  return BoundReport(entries=tuple(comp.entries), paper_bound=paper_value,
                     certified_bound=cert,
                     product_bound=prod, estimate=est, sound=sound, scope=scope,
                     reasons=tuple(reasons), bn_mode=bn_mode, input_shape=input_shape,
                     folded_bound=folded, chain_bound=chain_value, certified_method=method,
                     flags=tuple(comp.flags))
