"""lipnorm's tightest certified bounds: the per-channel normalizer factors folded into the
kernels, and a compositional bound over the activation-slope set for explicit chains.

Two sound procedures; `upper_bound` reports the smaller as `certified_bound`.

1. Folded product (`fold_*`, used inside `bounds._Composer`; scales to ResNet-18).
   Jacobians of a normalizer at input u (channels last, groups of n entries):
     * BN eval / batch_fixed: exactly diag(s), s_c = gamma_c / sqrt(var_c + eps), so
       K -> BN is the linear map `K diag(s)` on K's output channels; its norm
       ||K diag(s)||_2 <= ||K||_2 max|s| (the paper's factor) and is computed exactly
       (dense) or certified (conv) on the folded kernel.
     * LN / GN / IN: per group g, J_g = diag(gamma_g) M_g / s_g with s_g = sqrt(var_g + eps)
       and M_g = C - (var_g / (var_g + eps)) w w^T, C = I - 11^T/n the centering projection
       and w = C u_g / ||C u_g|| (a unit vector in the range of C). M_g is symmetric with
       eigenvalues 0 (on 1), 1 - var/(var+eps) (on w) and 1 (the rest): ||M_g||_2 <= 1.
       So J = diag(gamma) blockdiag(M_g / s_g) with ||blockdiag(M_g / s_g)|| <= 1 / s_min.
       RMS: the same with C = I and mean square for var.
     * gamma is a per-channel diagonal. Between it and the next Linear there are only
       elementwise activations (Jacobian diag(phi'), which commutes with any diagonal),
       per-channel pools (avg, global avg, max: each output channel reads its own input
       channel, so diag(gamma) commutes up to tiling) and Flatten (the same diagonal
       tiled over positions). Hence ||K ... diag(gamma) X|| = ||K diag(gamma) ... X|| and
       gamma is folded into the next kernel's input channels; the normalizer contributes
       1 / sqrt(min sigma^2 + eps) (scope "data", as the paper's factor). Where no Linear
       follows in the same Sequential, max|gamma| is kept as a factor (still sound).
     * BN not directly after a Linear is folded forward like gamma.
   Residual: Lip(shortcut) + Lip(branch) (for the identity shortcut: 1 + Lip(branch)).

2. Chain bound (`ChainBound`, sequential nets whose linear maps fit as explicit matrices).
   J = A_m X_m A_{m-1} ... X_1 A_0 where A_k is the (exact, explicit) product of the
   affine maps between junctions (dense, conv, avg pools, BN eval, gamma) and X_j is a
   junction Jacobian:
     * an activation with slopes in [lo, hi] (relu [0, 1], leaky_relu [0.01, 1], tanh
       [0, 1], sigmoid [0, 1/4], identity [1, 1], else [-L, L]): X = diag(phi') with
       phi' in [lo, hi], i.e. X = diag(c) + R^{1/2} S R^{1/2}, c = (lo+hi)/2,
       R = diag((hi-lo)/2), S diagonal with entries in [-1, 1] (||S|| <= 1);
     * a normalizer (LN/GN/IN/RMS, gamma moved into the next A): X = blockdiag(M_g/s_g)
       = 0 + R^{1/2} Y R^{1/2} with R = phi I, phi = 1/s_min and ||Y|| <= 1.
   Expanding every X_j into its two terms writes J as a sum over the sets T of "cut"
   junctions; the term of T = {t_1 < ... < t_p} is
     P(t_p, m+1) R_{t_p}^{1/2} Y_{t_p} R_{t_p}^{1/2} P(t_{p-1}, t_p) ... P(0, t_1)
   with runs P(i, j) = A_{j-1} diag(c_{j-1}) ... diag(c_{i+1}) A_i (exact matrices), so
   by submultiplicativity and ||Y|| <= 1
     ||J|| <= sum_T prod_k ||R_{t_{k+1}}^{1/2} P(t_k, t_{k+1}) R_{t_k}^{1/2}||,
   computed exactly by a dynamic program over cut positions (O(m^2) run norms, float64).
   The term T = all junctions is the folded product with factor max(|lo|, |hi|) per
   activation, and every other term replaces the product of some layer norms by the norm
   of the layers' product, so this never exceeds the folded product by more than the
   sum's count of terms... and in practice is much smaller: for relu each junction gives
   ||A D B|| <= ||A B|| / 2 + ||A|| ||B|| / 2, the midpoint form of D in [0, I].
   Local version (`ChainBound.local`): on an l2 ball of radius r around x0 the
   pre-activation intervals (interval arithmetic intersected with row-norm x l2-deviation
   bounds) fix c = 1, R = 0 (always active) or c = 0, R = 0 (always inactive) per relu,
   and a normalizer's s_min is bounded below over the ball from ||C z0_g|| minus the
   l2 deviation of its input; the same dynamic program then bounds sup ||J_x f(x)||
   over the ball.

Every matrix norm is a float64 eigenvalue of the smaller Gram matrix with the margin
`_up` (relative 1e-9 plus 1e-9 x the product of the factors' norms, covering float64
rounding of the products).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

import numpy as np

from lipnorm.lipschitz import model_info
from lipnorm.lipschitz.operator_norms import ConvGeometry, conv_matrix
from lipnorm.models import structure as st

Path = tuple[str, ...]
PER_SAMPLE_NORMS = ("layer", "group", "instance", "rms")
# Ranges of phi' (the slope set) of each activation; others get [-L, L].
ACTIVATION_SLOPES = {"relu": (0.0, 1.0), "leaky_relu": (0.01, 1.0), "tanh": (0.0, 1.0),
                     "sigmoid": (0.0, 0.25), "identity": (1.0, 1.0)}
DEFAULT_CHAIN_MAX_DIM = 4096


def activation_slopes(node: st.Activation) -> tuple[float, float]:
  """(lo, hi) with phi' in [lo, hi] everywhere (a.e.) for this activation."""
  return ACTIVATION_SLOPES.get(node.name, (-node.lipschitz, node.lipschitz))


def spectral_norm(mat: np.ndarray) -> float:
  """||mat||_2 in float64 (eigvalsh of the smaller Gram matrix), no margin."""
  mat = np.asarray(mat, np.float64)
  if mat.size == 0:
    return 0.0
  gram = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
  return math.sqrt(max(float(np.linalg.eigvalsh(gram)[-1]), 0.0))


def _up(value: float, scale: float) -> float:
  """A float64-computed norm made a sound upper bound: rounding of products of float64
  matrices and of eigvalsh is far below 1e-9 of the factors' norm product `scale`."""
  return value * (1 + 1e-9) + 1e-9 * scale


# --------------------------------------------------------------------- folded product

def norm_channel_scale(node: st.Norm, variables: Mapping, bn_mode: str,
                       stats: Optional[Mapping]) -> Optional[np.ndarray]:
  """BN: the exact diagonal s = gamma / sqrt(var + eps) `[C]` (running var in eval,
  stats in batch_fixed), None where unavailable. Other kinds: gamma `[C]` (None: 1)."""
  params = model_info.get_at(variables.get("params", {}), node.path) or {}
  gamma = params.get("scale")
  gamma = None if gamma is None else np.asarray(gamma, np.float64)
  if node.kind != "batch":
    return gamma
  if bn_mode == "eval":
    var = model_info.get_at(variables.get("batch_stats", {}), node.path + ("var",))
  elif bn_mode == "batch_fixed" and stats is not None and node.path in stats:
    var = stats[node.path]
  else:
    return None
  if var is None:
    return None
  s = 1.0 / np.sqrt(np.asarray(var, np.float64) + node.epsilon)
  return s if gamma is None else gamma * s


def fold_kernel(kernel, kind: str, in_scale: Optional[np.ndarray],
                out_scale: Optional[np.ndarray], feature_group_count: int = 1) -> np.ndarray:
  """The kernel of `diag(out_scale) K diag(in_scale)` (per channel; dense `[in, out]`,
  conv `[kh, kw, in/groups, out]`), float64."""
  k = np.asarray(kernel, np.float64)
  if out_scale is not None:
    k = k * out_scale
  if in_scale is not None:
    if kind == "dense":
      k = k * in_scale[:, None]
    else:
      g, cin_g, cout = feature_group_count, k.shape[2], k.shape[3]
      s = np.asarray(in_scale).reshape(g, cin_g)           # input channel g*cin_g + i
      k = k * s[np.arange(cout) // (cout // g)].T[None, None]   # [cin_g, cout]
  return k


def folds_forward(node) -> bool:
  """Whether a per-channel diagonal commutes through `node`'s Jacobian (module doc)."""
  return isinstance(node, (st.Activation, st.Flatten)) or (
      isinstance(node, st.Pool) and node.kind in ("avg", "global_avg", "max"))


def tile_scale(scale: np.ndarray, size: int) -> np.ndarray:
  """A per-channel diagonal over `size` channels-last entries (after Flatten)."""
  return np.tile(scale, size // scale.shape[0])


# ---------------------------------------------------------------------- chain bound

@dataclasses.dataclass(frozen=True)
class Junction:
  """A nonlinear junction of the chain between A_k and A_{k+1}.

  kind: "act" (slopes lo..hi) or "norm" (LN/GN/IN/RMS; `groups` = group id of every
  flat entry, `center` False for RMS, `phi` = 1 / sqrt(min sigma^2 + eps) from the data
  scope or inf without stats, `epsilon`)."""
  kind: str
  path: Path
  size: int
  lo: float = 0.0
  hi: float = 1.0
  name: str = ""
  groups: Optional[np.ndarray] = None
  center: bool = True
  phi: float = math.inf
  epsilon: float = 1e-5


class NotAChain(ValueError):
  """The model is not a plain chain of explicit affine maps and junctions."""


@dataclasses.dataclass(frozen=True)
class ChainBound:
  """A sequential network as affines A_0..A_m (`[out, in]` float64 with bias) and
  junctions X_1..X_m (module docstring, part 2)."""
  matrices: tuple
  biases: tuple
  junctions: tuple
  input_size: int

  # ---------------------------------------------------------------- global / data
  def slope_sets(self) -> list[tuple[np.ndarray, np.ndarray]]:
    """(c, R) of every junction over its whole domain (data scope for normalizers)."""
    out = []
    for j in self.junctions:
      if j.kind == "act":
        out.append((np.full(j.size, (j.lo + j.hi) / 2), np.full(j.size, (j.hi - j.lo) / 2)))
      else:
        out.append(norm_set(j, j.phi))
    return out

  def jacobian_matrices(self, sets: Sequence) -> list[np.ndarray]:
    """The A_k for the dynamic program: a diagonal A_k (a normalizer's gamma) before a
    diagonal junction moves past it into A_{k+1} (diagonals commute), so gamma is
    folded into the next kernel as in the folded product."""
    mats = list(self.matrices)
    for k in range(1, len(mats) - 1):
      a = mats[k]
      if a.shape[0] == a.shape[1] and sets[k][0].ndim == 1 and \
          not np.any(a - np.diag(np.diagonal(a))):
        mats[k + 1] = mats[k + 1] * np.diagonal(a)[None, :]
        mats[k] = np.eye(a.shape[0])
    return mats

  def bound(self, sets: Optional[Sequence] = None) -> float:
    """The dynamic-program bound for junction sets `[(c, R)]` (default `slope_sets`)."""
    sets = sets if sets is not None else self.slope_sets()
    return chain_dp(self.jacobian_matrices(sets), sets)

  def eclipse_bound(self) -> float:
    """`eclipse_fast` on each stretch of relu junctions, times the normalizer junctions'
    norm bounds phi in between (sub-multiplicativity): inf where another activation or
    a normalizer without stats appears. A normalizer's gamma (a diagonal, commuting
    with the relu slopes) is folded into the next matrix as in `jacobian_matrices`."""
    if any(j.kind == "act" and (j.lo, j.hi) != (0.0, 1.0) for j in self.junctions):
      return math.inf
    mats = self.jacobian_matrices(self.slope_sets())
    total, stretch = 1.0, [mats[0]]
    for k, j in enumerate(self.junctions):
      if j.kind == "norm":
        total *= eclipse_fast(stretch) * j.phi
        stretch = [mats[k + 1]]
      else:
        stretch.append(mats[k + 1])
    return total * eclipse_fast(stretch)

  # ---------------------------------------------------------------- local (ball)
  def local_sets(self, x0: np.ndarray, radius: float) -> tuple[list, dict]:
    """Junction sets valid on the l2 ball of `radius` around the flat input `x0`, and
    counts of fixed / unknown relu neurons (module docstring, part 2)."""
    v0 = np.asarray(x0, np.float64).reshape(-1)
    lo, hi = v0 - radius, v0 + radius
    lam = float(radius)             # ||v(x) - v(x0)||_2 <= lam on the ball
    run, lam_h = None, lam          # v = run @ h + const, ||h(x) - h(x0)|| <= lam_h
    sets, fixed, unknown = [], 0, 0
    for k, mat in enumerate(self.matrices):
      bias = self.biases[k]
      mid, rad = (lo + hi) / 2, (hi - lo) / 2
      v0 = mat @ v0 + bias
      mid, rad = mat @ mid + bias, np.abs(mat) @ rad
      run = mat if run is None else mat @ run
      rows = np.sqrt(np.sum(run * run, axis=1)) * lam_h * (1 + 1e-9)
      lo = np.maximum(mid - rad * (1 + 1e-9), v0 - rows)
      hi = np.minimum(mid + rad * (1 + 1e-9), v0 + rows)
      lo, hi = np.minimum(lo, v0), np.maximum(hi, v0)
      dev = np.maximum(hi - v0, v0 - lo)
      lam = min(_up(spectral_norm(run), 0.0) * lam_h, float(np.linalg.norm(dev)) * (1 + 1e-9))
      if k == len(self.junctions):
        break
      j = self.junctions[k]
      if j.kind == "act":
        if (j.lo, j.hi) not in ((0.0, 1.0), (1.0, 1.0)):
          raise NotAChain(f"local bounds support relu / identity activations, not {j.name!r}")
        if j.lo == 1.0:
          sets.append((np.ones(j.size), np.zeros(j.size)))
          continue
        active, dead = lo >= 0, hi <= 0
        unk = ~(active | dead)
        fixed += int(np.sum(~unk))
        unknown += int(np.sum(unk))
        c = np.where(active, 1.0, np.where(dead, 0.0, 0.5))
        sets.append((c, np.where(unk, 0.5, 0.0)))
        v0, lo, hi = np.maximum(v0, 0), np.maximum(lo, 0), np.maximum(hi, 0)
        if unk.any():   # relu is 1-Lipschitz and moves entry i by at most dev_i
          lam = min(lam, float(np.linalg.norm(np.where(dead, 0.0, dev))) * (1 + 1e-9))
          run, lam_h = None, lam
        else:
          run = c[:, None] * run
      else:
        phi_g, lam_g_all, u0 = _norm_local(j, v0, dev, lam)
        phi = float(np.max(phi_g))
        center, delta = _norm_jacobian_at(j, v0, lam_g_all, phi_g)
        if delta < phi / 2:   # the exact Jacobian at z0 plus its variation over the ball
          sets.append((center, np.full(j.size, delta)))
        else:
          sets.append(norm_set(j, phi))
        per = (phi_g * lam_g_all)[j.groups]
        cap = np.sqrt(np.bincount(j.groups))[j.groups]
        v0 = u0
        lo, hi = np.maximum(u0 - per, -cap), np.minimum(u0 + per, cap)
        lam = min(phi * lam, float(np.linalg.norm(phi_g * lam_g_all)))
        run, lam_h = None, lam
    return sets, {"fixed": fixed, "unknown": unknown}

  def local(self, x0: np.ndarray, radius: float) -> tuple[float, dict]:
    """(bound on sup ||J_x f(x)||_2 over the l2 ball of `radius` around x0, counts)."""
    sets, counts = self.local_sets(x0, radius)
    return self.bound(sets), counts


def norm_set(j: Junction, phi: float) -> tuple[np.ndarray, np.ndarray]:
  """(center, R) of a normalizer junction with 1/s_g <= phi: per group
  0 <= M_g / s_g <= phi C_g (Loewner order; C_g the group's centering projection, I for
  RMS), so X = (phi/2) C + (phi/2) Y with ||Y|| <= 1 (Y = 2X/phi - C lies between -C
  and C): the center is the matrix (phi/2) C, R = phi/2."""
  if not math.isfinite(phi):
    return np.zeros(j.size), np.full(j.size, math.inf)
  if j.center:
    same = j.groups[:, None] == j.groups[None, :]
    center = np.eye(j.size) - same / np.bincount(j.groups)[j.groups][None, :]
  else:
    center = np.eye(j.size)
  return (phi / 2) * center, np.full(j.size, phi / 2)


def _norm_jacobian_at(j: Junction, z0: np.ndarray, lam_g: np.ndarray, phi_g: np.ndarray
                      ) -> tuple[np.ndarray, float]:
  """(the normalizer's Jacobian X0 at z0 without gamma, delta) with ||X(z) - X0|| <= delta
  for every z within the ball of `_norm_local`. Per group, N(z) = sqrt(n) g(C z) with
  g(y) = y / rho, rho = sqrt(||y||^2 + n eps); for a unit h,
  D[J_g](h) = -(y.h)/rho^3 I - (h y^T + y h^T)/rho^3 + 3 (y.h) y y^T / rho^5, of norm
  <= 6 ||y|| / rho^3 <= 6 / rho^2, so ||J_N(z) - J_N(z0)|| <= sqrt(n) 6 ||C(z - z0)||
  / rho_min^2 <= 6 lam_g / (sqrt(n) (var_lo + eps)) along the segment (the ball is
  convex and var >= var_lo on it); RMS: C = I, mean square for var."""
  n_groups = len(phi_g)
  sizes = np.bincount(j.groups, minlength=n_groups).astype(np.float64)
  mean = np.bincount(j.groups, z0, n_groups) / sizes if j.center else np.zeros(n_groups)
  y = z0 - mean[j.groups]
  s2 = np.bincount(j.groups, y * y, n_groups) / sizes + j.epsilon    # s0^2 per group
  same = j.groups[:, None] == j.groups[None, :]
  c = np.eye(j.size) - (same / sizes[j.groups][None, :] if j.center else 0.0)
  inv_s = 1.0 / np.sqrt(s2)[j.groups]
  outer = np.where(same, np.outer(y, y), 0.0) / (sizes * s2)[j.groups][None, :]
  center = inv_s[:, None] * (c - outer)
  delta = float(np.max(6 * lam_g * phi_g ** 2 / np.sqrt(sizes))) * (1 + 1e-6)
  return center, delta


def _norm_local(j: Junction, z0: np.ndarray, dev: np.ndarray, lam: float):
  """Per group: 1/s_min over inputs within l2 distance lam (and |z_i - z0_i| <= dev_i)
  of z0, the groups' deviation bounds, and the normalized value at z0 (no gamma).
  ||C z_g|| >= ||C z0_g|| - ||C (z - z0)_g|| >= ||C z0_g|| - min(lam, ||dev_g||)
  (C a projection, so a contraction), and var_g = ||C z_g||^2 / n_g."""
  n_groups = int(j.groups.max()) + 1
  sizes = np.bincount(j.groups, minlength=n_groups).astype(np.float64)
  mean = np.bincount(j.groups, z0, n_groups) / sizes if j.center else np.zeros(n_groups)
  centered = z0 - mean[j.groups]
  norm0 = np.sqrt(np.bincount(j.groups, centered ** 2, n_groups))
  lam_g = np.minimum(lam, np.sqrt(np.bincount(j.groups, dev ** 2, n_groups))) * (1 + 1e-9)
  var_lo = np.maximum(norm0 - lam_g, 0.0) ** 2 / sizes * (1 - 1e-9)
  phi_g = 1.0 / np.sqrt(var_lo + j.epsilon)
  var0 = norm0 ** 2 / sizes
  u0 = centered / np.sqrt(var0 + j.epsilon)[j.groups]
  return phi_g, lam_g, u0


def chain_dp(matrices: Sequence[np.ndarray], sets: Sequence) -> float:
  """sum over cut sets T of the products of run norms (module docstring, part 2):
  g[0] = 1; g[j] = sum_{i<j} g[i] ||R_j^1/2 P(i, j) R_i^1/2||; the result is g[m+1]."""
  m = len(sets)
  if len(matrices) != m + 1:
    raise ValueError(f"{len(matrices)} affine maps for {m} junctions")
  norms = [spectral_norm(a) for a in matrices]
  g = [0.0] * (m + 2)
  g[0] = 1.0
  for i in range(m + 1):
    if g[i] == 0.0:
      continue
    if i == 0:
      run, scale = np.asarray(matrices[0], np.float64), norms[0]
    else:
      sq = np.sqrt(sets[i - 1][1])
      if not sq.any():
        continue
      if not np.all(np.isfinite(sq)):
        return math.inf
      run, scale = matrices[i] * sq[None, :], norms[i] * float(sq.max())
    for j in range(i + 1, m + 2):
      if j == m + 1:
        g[j] += g[i] * _up(spectral_norm(run), scale)
        break
      c, r = sets[j - 1]
      sq = np.sqrt(r)
      if sq.any():
        if not np.all(np.isfinite(sq)):
          return math.inf
        g[j] += g[i] * _up(spectral_norm(sq[:, None] * run), scale * float(sq.max()))
      if not np.any(c):
        break
      if c.ndim == 2:   # a normalizer's center (phi/2) C, ||C|| = 1
        run = matrices[j] @ (c @ run)
        scale *= norms[j] * float(np.max(np.abs(np.diagonal(c))))
      else:
        run = matrices[j] @ (c[:, None] * run)
        scale *= norms[j] * float(np.max(np.abs(c)))
  return g[m + 1]


def eclipse_fast(matrices: Sequence[np.ndarray], margin: float = 1e-6) -> float:
  """ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024) for x -> A_m relu(... relu(A_0 x)):
  the closed-form sequential solution of LipSDP-Neuron's block-tridiagonal LMI with
  multipliers T_i = lambda_i I (a special case of LipSDP-Neuron's diagonal T, which is
  a certified bound for slope-restricted activations in [0, 1]). With m = 1/2 (the
  slope midpoint), X_0 = I and for each hidden layer i
      lambda_i = 1 / (2 m^2 lambda_max(A_i X_{i-1}^{-1} A_i^T)),
      X_i = lambda_i I - lambda_i^2 m^2 A_i X_{i-1}^{-1} A_i^T  (must stay > 0),
  Lip^2 <= lambda_max(A_m^T A_m X_{m-1}^{-1}). The float64 result gets the relative
  `margin`; a numerically indefinite X_i gives inf (no certificate)."""
  m2 = 0.25
  x_inv = np.eye(matrices[0].shape[1])
  for a in matrices[:-1]:
    q = a @ x_inv @ a.T
    q = (q + q.T) / 2
    top = float(np.linalg.eigvalsh(q)[-1])
    if not top > 0:
      return math.inf
    lam = 1.0 / (2 * m2 * top)
    x = lam * np.eye(a.shape[0]) - lam ** 2 * m2 * q
    x = (x + x.T) / 2
    w, v = np.linalg.eigh(x)
    if not w[0] > 1e-9 * w[-1]:
      return math.inf
    x_inv = (v / w) @ v.T
  last = matrices[-1]
  # lambda_max(A^T A X^{-1}) = lambda_max(A X^{-1} A^T) (same nonzero spectrum)
  q = last @ x_inv @ last.T
  top = float(np.linalg.eigvalsh((q + q.T) / 2)[-1])
  return math.sqrt(max(top, 0.0)) * (1 + margin)


def _linear_map(layer: st.Linear, params: Mapping, calls: Mapping, max_dim: int
                ) -> tuple[np.ndarray, np.ndarray, tuple]:
  """A dense / conv node as (matrix [out, in], bias [out], output shape), float64."""
  p = model_info.get_at(params, layer.path) or {}
  kernel = np.asarray(p["kernel"], np.float64)
  call = calls.get(layer.path)
  if call is None:
    raise NotAChain(f"{'/'.join(layer.path)} was never called")
  shape = tuple(call.in_shape[1:])
  bias = p.get("bias")
  if layer.kind == "dense":
    if len(shape) != 1:
      raise NotAChain("dense map on a feature map")
    b = np.zeros(kernel.shape[1]) if bias is None else np.asarray(bias, np.float64)
    return kernel.T, b, (kernel.shape[1],)
  geom = ConvGeometry.make(shape[:2], kernel.shape[:2], layer.strides, layer.padding)
  out = math.prod(geom.out_hw) * kernel.shape[3]
  if out > max_dim:
    raise NotAChain(f"conv {'/'.join(layer.path)} has {out} outputs > max_dim")
  mat = conv_matrix(kernel, geom, layer.feature_group_count)
  b = np.zeros(out) if bias is None else np.tile(np.asarray(bias, np.float64),
                                                 math.prod(geom.out_hw))
  return mat, b, (*geom.out_hw, kernel.shape[3])


def _avg_pool_map(layer: st.Pool, shape: tuple) -> tuple[np.ndarray, tuple]:
  """An average / global-average pooling node as (matrix [out, in], output shape)."""
  h, w, ch = shape
  if layer.kind == "global_avg":
    return np.tile(np.eye(ch), (1, h * w)) / (h * w), (ch,)
  window = tuple(layer.window)
  geom = ConvGeometry.make((h, w), window, tuple(layer.strides) or window, layer.padding)
  # ones (exact in float32), then the float64 division
  mat = conv_matrix(np.ones((*window, 1, ch), np.float32), geom, ch) / math.prod(window)
  return mat, (*geom.out_hw, ch)


def _norm_junction(layer: st.Norm, call, shape: tuple, stats: Optional[Mapping]
                   ) -> Junction:
  """The junction of a per-sample normalizer (LN / GN / IN / RMS) on `shape`: its
  groups, whether it centers, and phi = 1 / min sigma over the data scope (inf without
  `stats`)."""
  if layer.kind not in PER_SAMPLE_NORMS:
    raise NotAChain(f"normalizer kind {layer.kind!r}")
  n, ch = math.prod(shape), shape[-1]
  module = call.module if call is not None else None
  if layer.kind == "rms":
    n_groups = 1
  elif hasattr(module, "groups_for"):
    n_groups = module.groups_for(ch)
  else:
    raise NotAChain(f"cannot tell the groups of {'/'.join(layer.path)}")
  groups = np.tile(np.arange(ch) // (ch // n_groups), n // ch)
  phi = math.inf
  if stats is not None and layer.path in stats:
    phi = 1.0 / math.sqrt(float(np.min(stats[layer.path])) + layer.epsilon)
  return Junction("norm", layer.path, n, 0.0, 0.0, layer.kind, groups,
                  layer.kind != "rms", phi, layer.epsilon)


class _ChainBuilder:
  """Accumulates the affine segments of a chain between its junctions (activations and
  per-sample normalizers): `mats[i]`, `biases[i]` map junction i's output (the input for
  i = 0) to junction i+1's input; None stands for the identity until it is needed."""

  def __init__(self, size: int, max_dim: int):
    self.max_dim = max_dim
    self.mats: list = [None]
    self.biases: list = [np.zeros(size)]
    self.sizes: list = [size]
    self.junctions: list = []

  def push(self, mat: np.ndarray, bias: np.ndarray) -> None:
    """Composes an affine map onto the current segment."""
    if mat.shape[0] > self.max_dim:
      raise NotAChain(f"a map with {mat.shape[0]} outputs > max_dim={self.max_dim}")
    self.biases[-1] = mat @ self.biases[-1] + bias
    self.mats[-1] = mat if self.mats[-1] is None else mat @ self.mats[-1]

  def junction(self, j: Junction, mat: Optional[np.ndarray], bias: np.ndarray) -> None:
    """Ends the current segment at junction `j`; the next one starts with (mat, bias)."""
    self.junctions.append(j)
    self.mats.append(mat)
    self.biases.append(bias)
    self.sizes.append(j.size)

  def bound(self, input_size: int) -> "ChainBound":
    mats = [np.eye(n) if m is None else m for m, n in zip(self.mats, self.sizes)]
    return ChainBound(tuple(mats), tuple(self.biases), tuple(self.junctions), input_size)


def build_chain(node: st.Node, variables: Mapping, calls: Mapping, input_shape: tuple,
                bn_mode: str, stats: Optional[Mapping],
                max_dim: int = DEFAULT_CHAIN_MAX_DIM) -> ChainBound:
  """The `ChainBound` of a Sequential of Linear / Norm / Activation / Pool(avg) /
  Flatten nodes whose maps have at most `max_dim` inputs and outputs; NotAChain with
  the reason otherwise (then only the folded product applies)."""
  layers = node.layers if isinstance(node, st.Sequential) else (node,)
  params = variables.get("params", {})
  shape = tuple(input_shape)
  size = math.prod(shape)
  if size > max_dim:
    raise NotAChain(f"input of {size} entries > max_dim={max_dim}")
  chain = _ChainBuilder(size, max_dim)
  for layer in layers:
    if isinstance(layer, st.Flatten):
      shape = (math.prod(shape),)
    elif isinstance(layer, st.Linear):
      mat, bias, shape = _linear_map(layer, params, calls, max_dim)
      chain.push(mat, bias)
    elif isinstance(layer, st.Norm):
      if layer.kind == "none":
        continue
      call = calls.get(layer.path)
      shape = tuple(call.in_shape[1:]) if call is not None else shape
      n, ch = math.prod(shape), shape[-1]
      p = model_info.get_at(params, layer.path) or {}
      beta = np.zeros(ch) if p.get("bias") is None else np.asarray(p["bias"], np.float64)
      if layer.kind == "batch":     # eval mode: an affine map, folded into the segment
        if bn_mode != "eval":
          raise NotAChain("chain bounds take BN in eval mode only")
        s = norm_channel_scale(layer, variables, bn_mode, stats)
        mean = np.asarray(model_info.get_at(variables["batch_stats"], layer.path + ("mean",)),
                          np.float64)
        chain.push(np.diag(tile_scale(s, n)), tile_scale(beta - mean * s, n))
        continue
      j = _norm_junction(layer, call, shape, stats)
      gamma = norm_channel_scale(layer, variables, bn_mode, stats)
      gamma = np.ones(ch) if gamma is None else gamma
      chain.junction(j, np.diag(tile_scale(gamma, n)), tile_scale(beta, n))
    elif isinstance(layer, st.Activation):
      lo, hi = activation_slopes(layer)
      n = math.prod(shape)
      chain.junction(Junction("act", (), n, lo, hi, layer.name), None, np.zeros(n))
    elif isinstance(layer, st.Pool) and layer.kind in ("avg", "global_avg"):
      mat, shape = _avg_pool_map(layer, shape)
      chain.push(mat, np.zeros(mat.shape[0]))
    else:
      raise NotAChain(f"{type(layer).__name__} node (not a plain chain)")
  return chain.bound(size)


# ---------------------------------------------------------------------- local bounds

@dataclasses.dataclass(frozen=True)
class LocalBoundReport:
  """Certified local bounds: `values[i]` >= sup ||J_x f(x)||_2 over the l2 ball of
  `radius` around example i (so >= the local constant at x_i, and a Lipschitz constant
  of f on that ball). `raw[i]` is the chain program's value; where the global
  certified bound holds everywhere (`global_scope == "global"`) `values` is the smaller
  of the two, else `values == raw`. `fixed` / `unknown`: relu neurons whose slope the
  ball fixes / leaves open, per example."""
  values: np.ndarray
  raw: np.ndarray
  radius: float
  scope: str
  global_certified: float
  global_scope: str
  fixed: np.ndarray
  unknown: np.ndarray


def local_upper_bound(model, variables: Mapping, xs, radius: float, *,
                      stats: Optional[Mapping] = None, bn_mode: str = "eval",
                      chain_max_dim: int = DEFAULT_CHAIN_MAX_DIM) -> LocalBoundReport:
  """Certified bounds on the local Lipschitz constant over l2 balls of `radius` around
  each example of `xs` `[N, ...]` (module docstring, part 2). Sequential chains of
  dense / conv / avg-pool maps, BN (eval), LN/GN/IN/RMS and relu (or identity)
  activations; ValueError otherwise. `stats` only feeds the global bound reported
  beside the local ones."""
  from lipnorm.lipschitz import bounds   # noqa: PLC0415  (bounds imports this module)
  if not radius >= 0 or not math.isfinite(radius):
    raise ValueError(f"radius={radius!r}; allowed: a finite number >= 0")
  if bn_mode != "eval":
    raise ValueError(f"bn_mode={bn_mode!r}; local bounds take BN in 'eval' mode only")
  node = model_info.structure_of(model)
  if node is None:
    raise ValueError(f"{type(model).__name__} has no structure()")
  xs = np.asarray(xs, np.float64)
  if xs.ndim < 2 or xs.shape[0] < 1:
    raise ValueError(f"xs must be a batch [N, ...], got shape {xs.shape}")
  shape = tuple(xs.shape[1:])
  calls = model_info.module_calls(model, variables, shape)
  try:
    chain = build_chain(node, variables, calls, shape, bn_mode, stats, chain_max_dim)
  except NotAChain as e:
    raise ValueError(f"local bounds need a sequential chain of explicit maps: {e}") from e
  report = bounds.upper_bound(model, variables, input_shape=shape, stats=stats,
                              bn_mode=bn_mode, chain_max_dim=chain_max_dim)
  raw, fixed, unknown = [], [], []
  for x in xs:
    try:
      value, counts = chain.local(x.reshape(-1), float(radius))
    except NotAChain as e:
      raise ValueError(f"local bounds: {e}") from e
    raw.append(value)
    fixed.append(counts["fixed"])
    unknown.append(counts["unknown"])
  raw = np.asarray(raw)
  values = np.minimum(raw, report.certified_bound) if report.scope == "global" else raw
  return LocalBoundReport(values, raw, float(radius),
                          f"l2 ball of radius {radius:g} around each example",
                          report.certified_bound, report.scope, np.asarray(fixed),
                          np.asarray(unknown))
