"""Top eigenvalues of the loss Hessian w.r.t. parameters (loss smoothness / sharpness).

`hessian_top_eigenvalues(loss_fn, params, batch)` never forms the Hessian: it applies
`H v = d/dt grad L(theta + t v)` (`jax.jvp` of `jax.grad`, forward-over-reverse) inside
Lanczos (default) or power iteration, on the parameters flattened to one vector.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree

from lipnorm.lipschitz.errors import NonFiniteError
from lipnorm.lipschitz.spectral import check_iterative_args, lanczos, power_iteration

HESSIAN_METHODS = ("lanczos", "power")


@struct.dataclass
class HessianEigenResult:
  """eigenvalues `[k]` (descending); residuals `[k]`: `||H y - lambda y|| / |lambda|`;
  iterations: Hessian-vector products used; converged: the stopping criterion was met
  for all k; rel_change: relative change of the eigenvalues in the last iteration;
  eigenvectors: pytree like params with a leading axis k (unit norm when flattened)."""
  eigenvalues: jax.Array
  residuals: jax.Array
  iterations: jax.Array
  converged: jax.Array
  rel_change: jax.Array
  eigenvectors: Any
  method: str = struct.field(pytree_node=False, default="")


def hvp_fn(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any):
  """(flat params, `v -> H v` on flat vectors, unravel) for `loss_fn(params, batch)`."""
  flat, unravel = ravel_pytree(params)

  def grad_flat(p):
    return ravel_pytree(jax.grad(loss_fn)(unravel(p), batch))[0]

  def hvp(v):
    return jax.jvp(grad_flat, (flat,), (v,))[1]
  return flat, hvp, unravel


def _shifted_power(hvp, start, num_iters, tol, found, eig):
  shift = eig.eigenvalues[0]
  shifted = power_iteration(lambda v: hvp(v) - shift * v, start, num_iters=num_iters,
                            tol=tol, deflate=found)
  return shifted.replace(eigenvalues=shifted.eigenvalues + shift,
                         iterations=shifted.iterations + eig.iterations)


@functools.partial(jax.jit, static_argnames=("loss_fn", "k", "method", "num_iters", "tol"))
def _top_eigs(loss_fn, params, batch, key, *, k, method, num_iters, tol):
  flat, hvp, unravel = hvp_fn(loss_fn, params, batch)
  if method == "lanczos":
    v0 = jax.random.normal(key, flat.shape, flat.dtype)
    eig = lanczos(hvp, v0, k=k, num_iters=num_iters, tol=tol)
    vals, vecs, res = eig.eigenvalues, eig.eigenvectors, eig.residuals
    iters, conv, rel = eig.iterations, eig.converged, eig.rel_change
  else:
    vals, vecs, res, iters, conv, rel = [], [], [], 0, True, 0.0
    for i in range(k):   # deflation: each next vector orthogonal to those found
      found = jnp.stack(vecs) if vecs else None
      start = jax.random.normal(jax.random.fold_in(key, i), flat.shape, flat.dtype)
      eig = power_iteration(hvp, start, num_iters=num_iters, tol=tol, deflate=found)
      # Power iteration finds the eigenvalue of largest magnitude; when that is negative
      # the largest one is the dominant eigenvalue of H - theta I (all >= 0), plus theta.
      eig = jax.lax.cond(eig.eigenvalues[0] < 0, functools.partial(
          _shifted_power, hvp, start, num_iters, tol, found), lambda e: e, eig)
      vals.append(eig.eigenvalues[0])
      vecs.append(eig.eigenvectors[0])
      res.append(eig.residuals[0])
      iters, conv = iters + eig.iterations, conv & eig.converged
      rel = jnp.maximum(rel, eig.rel_change)
    vals, vecs, res = jnp.stack(vals), jnp.stack(vecs), jnp.stack(res)
    order = jnp.argsort(-vals)
    vals, vecs, res = vals[order], vecs[order], res[order]
  rel_res = res / jnp.maximum(jnp.abs(vals), jnp.finfo(vals.dtype).tiny)
  return HessianEigenResult(eigenvalues=vals, residuals=rel_res, iterations=iters,
                            converged=conv, rel_change=rel,
                            eigenvectors=jax.vmap(unravel)(vecs),
                            method=method), loss_fn(params, batch)


@functools.lru_cache(maxsize=64)
def _cached_loss_shape(loss_fn, treedef, leaf_types):
  args = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaf_types])
  return jax.eval_shape(loss_fn, *args)


def _loss_shape(loss_fn, params, batch) -> jax.ShapeDtypeStruct:
  """`jax.eval_shape(loss_fn, params, batch)`, traced once per loss_fn and shapes."""
  leaves, treedef = jax.tree.flatten((params, batch))
  return _cached_loss_shape(loss_fn, treedef, tuple((jnp.shape(x), jnp.result_type(x))
                                                    for x in leaves))


def hessian_top_eigenvalues(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                            batch: Any, *, k: int = 1, method: str = "lanczos",
                            num_iters: int = 100, tol: float = 1e-6, key=None
                            ) -> HessianEigenResult:
  """Top-k eigenvalues of the Hessian of `loss_fn(params, batch)` (a scalar) w.r.t.
  `params` (any pytree, flattened).

  method "lanczos": the k largest (algebraic) eigenvalues, Lanczos with full
  reorthogonalization; stops when each Ritz residual is <= tol * |lambda| (memory
  `num_iters x num_params`). method "power": power iteration with deflation for each of
  the k, stopping on relative change <= tol; when the dominant eigenvalue theta found is
  negative it reruns on `H - theta I` so the result is still the largest algebraic one
  (memory O(num_params), slower convergence). `loss_fn` is a static argument of a
  jitted function: pass the same function object to reuse the compilation. Raises
  ValueError on bad arguments, NonFiniteError on a non-finite loss.
  """
  if method not in HESSIAN_METHODS:
    raise ValueError(f"method={method!r}; allowed: {', '.join(HESSIAN_METHODS)}")
  check_iterative_args(num_iters, tol)
  num_params = sum(jnp.size(p) for p in jax.tree.leaves(params))
  if not isinstance(k, int) or not 1 <= k <= num_params:
    raise ValueError(f"k={k!r} must be an int in [1, {num_params}] (number of parameters)")
  if method == "lanczos" and num_iters < k:
    raise ValueError(f"num_iters={num_iters} must be >= k={k} for Lanczos")
  loss = _loss_shape(loss_fn, params, batch)   # a (cached) trace, not a forward pass
  if loss.ndim != 0:
    raise ValueError(f"loss_fn must return a scalar, got shape {loss.shape}")
  key = jax.random.key(0) if key is None else key
  # the loss comes out of the same compiled call: checking it eagerly beforehand cost an
  # op-by-op forward pass (and its first-call compiles) on every call
  res, loss = _top_eigs(loss_fn, params, batch, key, k=k, method=method,
                        num_iters=num_iters, tol=float(tol))
  if not bool(jnp.isfinite(loss)):
    raise NonFiniteError(f"loss_fn(params, batch) = {float(loss)} is not finite")
  return res
