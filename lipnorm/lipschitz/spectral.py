"""Spectral norms of Jacobians and top eigenvalues of symmetric linear operators.

`jacobian_spectral_norm(f, x)` is `||J_x f(x)||_2`, the largest singular value of the
Jacobian of `f` at `x` with input and output pytrees flattened to vectors
(`jax.flatten_util.ravel_pytree`). Methods:

  * `"jacfwd"`: form J with `in_dim` JVPs (vmapped), exact.
  * `"jacrev"`: form J with `out_dim` VJPs (vmapped), exact. 10 logits cost 10 VJPs.
  * `"power"`: power iteration on the smaller Gram matrix (`J^T J` or `J J^T`) through
    `jax.linearize` (J v) and its transpose (J^T u); J is never formed.
  * `"lanczos"`: Lanczos with full reorthogonalization on the same Gram matrix.
  * `"auto"`: `choose_method` by input / output size and Jacobian memory.

The exact methods take the top eigenvalue of the smaller Gram matrix (`J J^T` when
`out_dim <= in_dim`, else `J^T J`) with `eigvalsh`; that is sigma_max^2 to working
precision (the error of the largest eigenvalue is ~eps * sigma_max^2).

The iterative routines (`power_iteration`, `lanczos`) work on any symmetric operator
given as a matvec on flat vectors, are jit- and vmap-compatible (`lax.while_loop`) and
report their iteration count and convergence measures; the Hessian code reuses them.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree

from lipnorm.lipschitz.errors import NonFiniteError
from lipnorm.registry import Registry

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

# Jacobians larger than this (bytes, one example) are not formed by "auto".
DEFAULT_MAX_JACOBIAN_BYTES = 1 << 28


@struct.dataclass
class SpectralNormResult:
  """A Jacobian spectral norm and how it was obtained (fields may carry a batch axis).

  value: the estimate of `||J||_2`. Iterative estimates are Rayleigh quotients, so they
    never exceed the true value (up to rounding): a valid lower bound even if unconverged.
  iterations: Gram-matrix products used (each = one JVP + one VJP); 0 for exact methods.
  converged: exact methods: True; iterative: the stopping criterion was met before
    `num_iters` (power: relative change of `value**2` <= tol; Lanczos: Ritz residual
    `<= tol * value**2`, or an invariant subspace was found).
  rel_change: relative change of `value**2` in the last iteration (0 for exact).
  residual: `||A v - s^2 v|| / s^2` for the returned top vector v of the Gram matrix A
    (0 for exact methods).
  finite: f(x) and the estimate are all finite.
  method: the method actually used ("auto" resolved).
  """
  value: Array
  iterations: Array
  converged: Array
  rel_change: Array
  residual: Array
  finite: Array
  method: str = struct.field(pytree_node=False, default="")


@struct.dataclass
class EigResult:
  """Top eigenpairs of a symmetric operator from an iterative method.

  eigenvalues: `[k]`, descending. eigenvectors: `[k, n]` unit Ritz vectors.
  residuals: `[k]`, `||A y - theta y||` of each Ritz pair (absolute).
  rel_change: relative change of the top-k eigenvalues in the last iteration (max).
  iterations: operator applications used. converged: stopping criterion met.
  """
  eigenvalues: Array
  eigenvectors: Array
  residuals: Array
  rel_change: Array
  iterations: Array
  converged: Array


def _dot(a: Array, b: Array) -> Array:
  return jnp.dot(a, b, precision=HIGHEST)


def _safe_normalize(v: Array) -> tuple[Array, Array]:
  nv = jnp.linalg.norm(v)
  return v / jnp.where(nv > 0, nv, 1.0), nv


def _tiny(dtype) -> float:
  return float(jnp.finfo(dtype).tiny) ** 0.5


def power_iteration(matvec: Callable[[Array], Array], v0: Array, *, num_iters: int,
                    tol: float, deflate: Optional[Array] = None) -> EigResult:
  """Power iteration for the dominant eigenvalue of a symmetric operator `A` (`[n]->[n]`).

  Stops when the relative change of the Rayleigh quotient `theta = v.A v` is <= `tol`
  or after `num_iters` applications. `deflate` (`[j, n]`, orthonormal rows) projects
  those directions out of every iterate (deflation for further eigenpairs). Returns an
  `EigResult` with k = 1. For PSD `A` (a Gram matrix) theta <= lambda_max always.
  """
  if num_iters < 1:
    raise ValueError(f"num_iters={num_iters} must be >= 1")

  def project(v):
    if deflate is None:
      return v
    return v - jnp.matmul(deflate.T, jnp.matmul(deflate, v, precision=HIGHEST),
                          precision=HIGHEST)

  v, _ = _safe_normalize(project(v0))
  w = matvec(v)
  theta = _dot(v, w)
  inf = jnp.asarray(jnp.inf, theta.dtype)

  def cond(s):
    i, _, _, _, rel = s
    return (i < num_iters) & (rel > tol)

  def body(s):
    i, v, w, theta, _ = s
    v_new, nw = _safe_normalize(project(w))
    w_new = matvec(v_new)
    theta_new = _dot(v_new, w_new)
    rel = jnp.abs(theta_new - theta) / jnp.maximum(jnp.abs(theta_new), _tiny(theta.dtype))
    rel = jnp.where(nw > 0, rel, 0.0)   # A v = 0: nothing left to iterate
    return i + 1, v_new, w_new, theta_new, rel

  i, v, w, theta, rel = jax.lax.while_loop(cond, body, (jnp.asarray(1), v, w, theta, inf))
  residual = jnp.linalg.norm(project(w) - theta * v)
  return EigResult(eigenvalues=theta[None], eigenvectors=v[None], residuals=residual[None],
                   rel_change=rel, iterations=i, converged=rel <= tol)


def lanczos(matvec: Callable[[Array], Array], v0: Array, *, k: int = 1, num_iters: int,
            tol: float) -> EigResult:
  """Lanczos with full reorthogonalization for the top-k (largest algebraic)
  eigenvalues of a symmetric operator `A` (`[n] -> [n]`).

  Builds a Krylov basis of dimension up to `min(num_iters, n)` (memory `num_iters x n`)
  and stops when every top-k Ritz pair has residual `|beta_j * y_last| <= tol *
  |theta|` (the Ritz residual `||A y - theta y||`), or when the basis spans an invariant
  subspace (then the Ritz values are exact). Ritz values never exceed lambda_max.
  """
  n = v0.shape[0]
  m = min(num_iters, n)
  if k < 1 or k > n:
    raise ValueError(f"k={k} eigenvalues requested; allowed 1 <= k <= dimension {n}")
  if m < k:
    raise ValueError(f"num_iters={num_iters} must be >= k={k}")
  dtype = v0.dtype
  basis = jnp.zeros((m + 1, n), dtype)
  v, _ = _safe_normalize(v0)
  basis = basis.at[0].set(v)
  alpha = jnp.zeros((m,), dtype)
  beta = jnp.zeros((m,), dtype)
  idx = jnp.arange(m)

  def ritz(alpha, beta, j):
    """Top-k Ritz values / vectors of the j+1 x j+1 leading block of T (static shapes:
    unused diagonal entries are set below a Gershgorin lower bound of the used block so
    they never rank among the top k)."""
    used = idx <= j
    off = jnp.where(idx < j, beta, 0.0)
    off_prev = jnp.concatenate([jnp.zeros((1,), dtype), off[:-1]])
    lower = jnp.min(jnp.where(used, alpha - jnp.abs(off) - jnp.abs(off_prev), jnp.inf))
    scale = jnp.max(jnp.where(used, jnp.abs(alpha) + jnp.abs(off) + jnp.abs(off_prev), 0.0))
    diag = jnp.where(used, alpha, lower - 1.0 - scale)
    t = jnp.diag(diag) + jnp.diag(off[:-1], 1) + jnp.diag(off[:-1], -1)
    evals, evecs = jnp.linalg.eigh(t)
    top = evals[::-1][:k]
    y = evecs[:, ::-1][:, :k]                     # [m, k]
    res = jnp.abs(beta[j] * y[j])                 # Ritz residuals
    return top, y, res

  def step(s):
    j, basis, alpha, beta, theta_prev, _, _, _, _, _ = s
    v = basis[j]
    w = matvec(v)
    a = _dot(v, w)
    # Full reorthogonalization against the whole basis (rows > j are zero), twice.
    for _ in range(2):
      w = w - jnp.matmul(basis.T, jnp.matmul(basis, w, precision=HIGHEST), precision=HIGHEST)
    v_next, b = _safe_normalize(w)
    alpha = alpha.at[j].set(a)
    beta = beta.at[j].set(b)
    basis = basis.at[j + 1].set(v_next)
    theta, y, res = ritz(alpha, beta, j)
    scale = jnp.maximum(jnp.max(jnp.abs(theta)), _tiny(dtype))
    breakdown = b <= 100 * jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(a), scale)
    rel = jnp.max(jnp.abs(theta - theta_prev)) / scale
    done = breakdown | ((j + 1 >= k) & jnp.all(res <= tol * jnp.maximum(jnp.abs(theta),
                                                                         _tiny(dtype))))
    return j + 1, basis, alpha, beta, theta, rel, done, breakdown, y, res

  def cond(s):
    j, _, _, _, _, _, done, _, _, _ = s
    return (j < m) & ~done

  inf = jnp.asarray(jnp.inf, dtype)
  theta0 = jnp.full((k,), jnp.inf, dtype)
  state = (jnp.asarray(0), basis, alpha, beta, theta0, inf, jnp.asarray(False),
           jnp.asarray(False), jnp.zeros((m, k), dtype), jnp.zeros((k,), dtype))
  # the Ritz pairs of the last step are carried out of the loop (no second eigh)
  j, basis, alpha, beta, theta, rel, done, breakdown, y, res = jax.lax.while_loop(
      cond, step, state)
  res = jnp.where(breakdown, 0.0, res)
  vecs = jnp.matmul(y.T, basis[:m], precision=HIGHEST)   # [k, n]
  vecs = vecs / jnp.maximum(jnp.linalg.norm(vecs, axis=1, keepdims=True), _tiny(dtype))
  return EigResult(eigenvalues=theta, eigenvectors=vecs, residuals=res,
                   rel_change=jnp.where(j > 1, rel, inf), iterations=j, converged=done)


# ----------------------------------------------------------------------------- Jacobians

def _top_singular(jac: Array) -> tuple[Array, Array]:
  """Largest singular value of `jac` `[m, n]` and its right singular vector `[n]`,
  via the smaller Gram matrix."""
  m, n = jac.shape
  if m <= n:
    gram = jnp.matmul(jac, jac.T, precision=HIGHEST)
    evals, evecs = jnp.linalg.eigh(gram)
    s = jnp.sqrt(jnp.maximum(evals[-1], 0.0))
    v, _ = _safe_normalize(jnp.matmul(jac.T, evecs[:, -1], precision=HIGHEST))
  else:
    gram = jnp.matmul(jac.T, jac, precision=HIGHEST)
    evals, evecs = jnp.linalg.eigh(gram)
    s = jnp.sqrt(jnp.maximum(evals[-1], 0.0))
    v = evecs[:, -1]
  return s, v


def _exact(f: Callable[[Array], Array], x: Array, mode: str, num_iters, tol, key):
  del num_iters, tol, key
  if mode == "jacrev":
    y, vjp = jax.vjp(f, x)
    jac = jax.vmap(lambda c: vjp(c)[0])(jnp.eye(y.size, dtype=y.dtype))      # [m, n]
  else:
    y, lin = jax.linearize(f, x)
    jac = jax.vmap(lin)(jnp.eye(x.size, dtype=x.dtype)).T                   # [m, n]
  s, v = _top_singular(jac)
  zero = jnp.zeros((), s.dtype)
  res = SpectralNormResult(value=s, iterations=jnp.asarray(0), converged=jnp.asarray(True),
                           rel_change=zero, residual=zero,
                           finite=jnp.all(jnp.isfinite(y)) & jnp.isfinite(s), method=mode)
  return res, v


def _gram_operator(f: Callable[[Array], Array], x: Array):
  """(y, matvec, space, to_right) for the smaller Gram matrix of J = df/dx at x:
  `J^T J` on inputs when in_dim <= out_dim, else `J J^T` on outputs (`space` is x or y,
  the vector space it acts on). `to_right` maps
  the Gram eigenvector to the unit right singular vector."""
  y, lin = jax.linearize(f, x)
  lin_t = jax.linear_transpose(lin, x)
  if x.size <= y.size:
    return y, (lambda v: lin_t(lin(v))[0]), x, (lambda v: v)

  def to_right(u):
    return _safe_normalize(lin_t(u)[0])[0]
  return y, (lambda u: lin(lin_t(u)[0])), y, to_right


def _iterative(f, x, mode, num_iters, tol, key):
  y, matvec, space, to_right = _gram_operator(f, x)
  key = jax.random.key(0) if key is None else key
  v0 = jax.random.normal(key, space.shape, space.dtype)
  if mode == "power":
    eig = power_iteration(matvec, v0, num_iters=num_iters, tol=tol)
  else:
    eig = lanczos(matvec, v0, k=1, num_iters=num_iters, tol=tol)
  theta = jnp.maximum(eig.eigenvalues[0], 0.0)
  s = jnp.sqrt(theta)
  residual = eig.residuals[0] / jnp.maximum(theta, _tiny(theta.dtype))
  res = SpectralNormResult(value=s, iterations=eig.iterations, converged=eig.converged,
                           rel_change=eig.rel_change, residual=residual,
                           finite=jnp.all(jnp.isfinite(y)) & jnp.isfinite(s), method=mode)
  return res, to_right(eig.eigenvectors[0])


METHODS: Registry[Callable] = Registry("Jacobian spectral-norm method")
METHODS.register("jacfwd")(lambda f, x, n, t, k: _exact(f, x, "jacfwd", n, t, k))
METHODS.register("jacrev")(lambda f, x, n, t, k: _exact(f, x, "jacrev", n, t, k))
METHODS.register("power")(lambda f, x, n, t, k: _iterative(f, x, "power", n, t, k))
METHODS.register("lanczos")(lambda f, x, n, t, k: _iterative(f, x, "lanczos", n, t, k))
ALLOWED_METHODS = ("auto",) + tuple(METHODS.names())


def choose_method(in_dim: int, out_dim: int, itemsize: int = 4, *,
                  max_jacobian_bytes: int = DEFAULT_MAX_JACOBIAN_BYTES) -> str:
  """The method "auto" uses for a Jacobian `[out_dim, in_dim]`.

  Matrix-free Lanczos when the Jacobian would exceed `max_jacobian_bytes`; otherwise
  the cheaper exact mode: `jacfwd` (in_dim JVPs) when `in_dim <= out_dim`, else `jacrev`
  (out_dim VJPs). A CIFAR input (3072) with 10 logits therefore gets `jacrev`.
  """
  if in_dim * out_dim * itemsize > max_jacobian_bytes:
    return "lanczos"
  return "jacfwd" if in_dim <= out_dim else "jacrev"


def check_method(method: str) -> None:
  if method not in ALLOWED_METHODS:
    raise ValueError(f"method={method!r}; allowed: {', '.join(ALLOWED_METHODS)}")


def check_iterative_args(num_iters: int, tol: float) -> None:
  if not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"num_iters={num_iters!r} must be a positive int")
  if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
    raise ValueError(f"tol={tol!r} must be a number in [0, 1)")


def flatten_fn(f: Callable[[Any], Any], x: Any) -> tuple[Callable[[Array], Array], Array, int]:
  """`f` on pytrees -> `f_flat` on flat vectors, the flat `x`, and the flat output size."""
  x_flat, unravel = ravel_pytree(x)

  def f_flat(v):
    return ravel_pytree(f(unravel(v)))[0]
  out = jax.eval_shape(f_flat, x_flat)
  return f_flat, x_flat, math.prod(out.shape)


def resolve_method(method: str, in_dim: int, out_dim: int, itemsize: int,
                   max_jacobian_bytes: int) -> str:
  check_method(method)
  if method == "auto":
    return choose_method(in_dim, out_dim, itemsize, max_jacobian_bytes=max_jacobian_bytes)
  return method


def spectral_norm_flat(f_flat: Callable[[Array], Array], x_flat: Array, method: str, *,
                       num_iters: int, tol: float, key=None
                       ) -> tuple[SpectralNormResult, Array]:
  """`||J||_2` of a flat function at a flat point with a resolved method; also returns
  the top right singular vector (unit, `[in_dim]`). Traceable (jit / vmap)."""
  return METHODS.get(method)(f_flat, x_flat, num_iters, tol, key)


def is_concrete(x: Any) -> bool:
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def check_finite(result: SpectralNormResult, what: str) -> None:
  """NonFiniteError when outputs or estimates are non-finite (skipped under tracing)."""
  if not is_concrete(result.finite):
    return
  finite = jnp.atleast_1d(result.finite)
  if not bool(jnp.all(finite)):
    bad = [int(i) for i in jnp.nonzero(~finite)[0][:10]]
    raise NonFiniteError(f"{what}: non-finite model outputs or Jacobian norm"
                     + (f" at example indices {bad}" if finite.size > 1 else "")
                     + "; check the inputs (NaN/inf) and the parameters")


def jacobian_spectral_norm(f: Callable[[Any], Any], x: Any, *, method: str = "auto",
                           num_iters: int = 100, tol: float = 1e-6, key=None,
                           max_jacobian_bytes: int = DEFAULT_MAX_JACOBIAN_BYTES
                           ) -> SpectralNormResult:
  """`||J_x f(x)||_2`: the largest singular value of the Jacobian of `f` at `x`.

  Args:
    f: a function of one pytree returning a pytree; both are flattened (ravel_pytree)
      so J has shape `[out_size, in_size]`.
    x: the point (pytree of arrays).
    method: "auto", "jacfwd", "jacrev", "power" or "lanczos" (see module docstring).
    num_iters: maximum Gram-matrix products for the iterative methods.
    tol: relative tolerance of the iterative methods on `value**2` (power: relative
      change; Lanczos: Ritz residual); `value` then has relative error ~tol/2 or less.
    key: PRNG key for the random start vector (default `jax.random.key(0)`).
    max_jacobian_bytes: "auto" stays matrix-free above this Jacobian size.

  Returns a `SpectralNormResult`. Raises ValueError on a bad method and (outside jit)
  NonFiniteError on non-finite outputs.
  """
  check_method(method)
  check_iterative_args(num_iters, tol)
  f_flat, x_flat, out_dim = flatten_fn(f, x)
  method = resolve_method(method, x_flat.size, out_dim, x_flat.dtype.itemsize,
                          max_jacobian_bytes)
  res, _ = spectral_norm_flat(f_flat, x_flat, method, num_iters=num_iters, tol=tol, key=key)
  check_finite(res, "jacobian_spectral_norm")
  return res
