"""Per-example local Lipschitz constants of a Flax model w.r.t. its input and parameters.

`input_lipschitz` gives `||J_x f(x)||_2` and `param_lipschitz` gives
`||J_theta f(x; theta)||_2` (all parameters flattened into one vector, and optionally
per layer) for every example of a batch, vmapped (in memory-bounded chunks) and
jit-compiled.

BatchNorm regimes (`bn_mode`, required with BN; docs/theory.md#batchnorm-regimes):
  * "eval": running statistics; `f(x) = model.apply(v, x[None], train=False)[0]` is a
    function of one example.
  * "batch_fixed": this batch's BN statistics (mean, var of each BN input over `xs`) are
    computed once and held constant; each example is then evaluated alone with them,
    i.e. BN is the affine map it is in this training step, without the coupling.
  * "batch_coupled": `f_i(x) = model.apply(v, xs.at[i].set(x), use_batch_stats=True)[i]`:
    example i's output w.r.t. example i's input with the rest of the batch fixed,
    differentiating through the batch statistics (running stats are never touched).
For parameters the same three definitions apply with theta as the variable (in
"batch_fixed" the statistics are those of the current parameters, held constant).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from lipnorm.lipschitz import model_info
from lipnorm.lipschitz.spectral import (DEFAULT_MAX_JACOBIAN_BYTES, HIGHEST,
                                        SpectralNormResult, check_finite,
                                        check_iterative_args, check_method, resolve_method,
                                        spectral_norm_flat)
from lipnorm.models import structure as st

Path = tuple[str, ...]
DEFAULT_MAX_MEMORY_BYTES = 4 << 30
# Gram-matrix products of one iterative estimate that are live at once (linearize
# residuals + one JVP + one VJP), for the memory estimate.
_ITERATIVE_LIVE = 3


# ------------------------------------------------------------------ per-example functions

def batch_fixed_variables(model: nn.Module, variables: Mapping, xs: jax.Array) -> dict:
  """`variables` with each BatchNorm's `batch_stats` (mean, var) replaced by the
  statistics of its input on the batch `xs` (read from the `norm_stats` collection of
  one forward pass with batch statistics). Evaluating the result in eval mode is BN with
  this batch's statistics held constant."""
  _, state = model.apply(variables, xs, use_batch_stats=True, mutable=["norm_stats"])
  stats = state.get("norm_stats", {})
  flat = traverse_util.flatten_dict(dict(variables["batch_stats"]))
  new = {}
  for key in flat:
    path, name = key[:-1], key[-1]
    sown = model_info.get_at(stats, path)
    if sown is None or name not in sown:
      raise ValueError(f"batch_fixed: BatchNorm at {'/'.join(path)} sowed no {name!r} into "
                       "'norm_stats'; use the normalizers of lipnorm.normalizers")
    new[key] = jnp.asarray(sown[name]).astype(flat[key].dtype)
  return {**variables, "batch_stats": traverse_util.unflatten_dict(new)}


def example_apply(model: nn.Module, mode: str) -> Callable:
  """`apply_one(variables, xs, x, i)`: the model's output for example i when its input
  is x, under BN regime `mode` (see module docstring). For "batch_fixed" pass
  variables from `batch_fixed_variables`."""
  if mode == "batch_coupled":
    def apply_one(variables, xs, x, i):
      return model.apply(variables, xs.at[i].set(x), use_batch_stats=True)[i]
  else:
    def apply_one(variables, xs, x, i):
      del xs, i
      return model.apply(variables, x[None], train=False)[0]
  return apply_one


def prepare_variables(model: nn.Module, variables: Mapping, xs: jax.Array, mode: str) -> dict:
  """The variables `example_apply` needs under `mode`: without the `norm_stats`
  collection, and with this batch's BN statistics substituted for "batch_fixed"."""
  variables = {k: v for k, v in variables.items() if k != "norm_stats"}
  if mode == "batch_fixed":
    variables = batch_fixed_variables(model, variables, xs)
  return variables


def _map(fn: Callable, args: tuple, batch_size: Optional[int]):
  """vmap of `fn(args)` over the leading axis, in chunks of `batch_size` if given."""
  n = jax.tree.leaves(args)[0].shape[0]
  if batch_size is None or batch_size >= n:
    return jax.vmap(fn)(args)
  return jax.lax.map(fn, args, batch_size=batch_size)


def _keys(key, n: int):
  key = jax.random.key(0) if key is None else key
  return jax.random.split(key, n)


def _chunk(n: int, per_example_bytes: float, max_memory_bytes: int) -> Optional[int]:
  size = max(1, int(max_memory_bytes // max(per_example_bytes, 1)))
  return None if size >= n else size


def _products(method: str, in_dim: int, out_dim: int) -> int:
  return {"jacrev": out_dim, "jacfwd": in_dim}.get(method, _ITERATIVE_LIVE)


# ------------------------------------------------------------------------ input Lipschitz

@functools.partial(jax.jit, static_argnames=("model", "mode", "method", "num_iters",
                                             "tol", "batch_size"))
def _input_impl(model, variables, xs, points, keys, *, mode, method, num_iters, tol,
                batch_size):
  """Local constants at `points[i]` (example i's input) where the batch `xs` defines
  the BN statistics ("batch_fixed") or the rest of the batch ("batch_coupled")."""
  variables = prepare_variables(model, variables, xs, mode)
  apply_one = example_apply(model, mode)
  shape = xs.shape[1:]

  def one(args):
    x, i, key = args

    def f(v):
      return ravel_pytree(apply_one(variables, xs, v.reshape(shape), i))[0]
    return spectral_norm_flat(f, x.reshape(-1), method, num_iters=num_iters, tol=tol,
                              key=key)[0]
  return _map(one, (points, jnp.arange(xs.shape[0]), keys), batch_size)


def input_lipschitz(model: nn.Module, variables: Mapping, xs: jax.Array, *,
                    bn_mode: Optional[str] = None, method: str = "auto",
                    num_iters: int = 100, tol: float = 1e-6, key=None,
                    batch_size: Optional[int] = None,
                    max_jacobian_bytes: int = DEFAULT_MAX_JACOBIAN_BYTES,
                    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
                    points: Optional[jax.Array] = None) -> SpectralNormResult:
  """Local input Lipschitz constants `||J_x f(x_i)||_2` of every example of `xs`.

  Args:
    model, variables: a Flax model (`apply(v, x, train=False, use_batch_stats=None)`)
      and its variables.
    xs: `[N, ...]` batch of inputs.
    bn_mode: "eval" | "batch_fixed" | "batch_coupled" (module docstring); required iff
      the model has BatchNorm.
    method: see `jacobian_spectral_norm` ("auto": jacrev for 10 logits of a big input).
    num_iters, tol, key: for the iterative methods (one key per example is split off).
    batch_size: examples processed at once (vmap chunk); default from `max_memory_bytes`
      and a per-example estimate (activations x simultaneous products + Jacobian).
    points: optional `[N, ...]`: evaluate example i's Jacobian at input `points[i]`
      instead of `xs[i]`, with `xs` still defining the batch statistics / the rest of
      the batch (used by `lower_bound_search`).

  Returns a `SpectralNormResult` whose fields have a leading axis N (`.value` `[N]`).
  Raises ValueError for a bad shape, method or bn_mode, and non-finite outputs.
  """
  check_method(method)
  check_iterative_args(num_iters, tol)
  mode = model_info.resolve_bn_mode(model, variables, bn_mode)
  xs = jnp.asarray(xs)
  out_dim, act = model_info.check_batch(model, variables, xs)
  n = xs.shape[0]
  in_dim = math.prod(xs.shape[1:])
  method = resolve_method(method, in_dim, out_dim, xs.dtype.itemsize, max_jacobian_bytes)
  if batch_size is None:
    act *= n if mode == "batch_coupled" else 1
    per = act * _products(method, in_dim, out_dim) + in_dim * out_dim * xs.dtype.itemsize
    batch_size = _chunk(n, per, max_memory_bytes)
  points = xs if points is None else jnp.asarray(points)
  if points.shape != xs.shape:
    raise ValueError(f"points shape {points.shape} must equal xs shape {xs.shape}")
  res = _input_impl(model, variables, xs, points, _keys(key, n),
                    mode=mode, method=method, num_iters=num_iters, tol=float(tol),
                    batch_size=batch_size)
  check_finite(res, "input_lipschitz")
  return res


# -------------------------------------------------------------------- parameter Lipschitz

@struct.dataclass
class ParamLipschitzResult:
  """`total`: `||J_theta f(x_i)||_2` over all parameters (fields `[N]`); `per_layer`:
  the same restricted to each parameter group (dict keyed by group path, see
  `param_groups`), empty unless requested."""
  total: SpectralNormResult
  per_layer: dict

  @property
  def value(self) -> jax.Array:
    return self.total.value


def param_groups(model: nn.Module, params: Mapping) -> dict[Path, tuple[Path, ...]]:
  """Partition of the parameter leaves into layers: each leaf goes to the longest
  Linear / Norm node path of `model.structure()` that prefixes it; leaves outside any
  node (or models without structure) go to their own module path. Keys in forward
  order of the structure, then the rest sorted. Values: leaf paths (`params[*leaf]`)."""
  leaves = sorted(traverse_util.flatten_dict(dict(params)))
  node = model_info.structure_of(model)
  node_paths = [n.path for n in st.iter_nodes(node)] if node is not None else []
  groups: dict[Path, list[Path]] = {p: [] for p in node_paths}
  for leaf in leaves:
    owners = [p for p in node_paths if leaf[:len(p)] == p]
    owner = max(owners, key=len) if owners else leaf[:-1]
    groups.setdefault(owner, []).append(leaf)
  return {p: tuple(v) for p, v in groups.items() if v}


def _exact_meta(value, finite, method, dtype):
  zero = jnp.zeros((), dtype)
  return SpectralNormResult(value=value, iterations=jnp.asarray(0),
                            converged=jnp.asarray(True), rel_change=zero, residual=zero,
                            finite=finite & jnp.isfinite(value), method=method)


def _gram_norm(gram):
  return jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram)[-1], 0.0))


def dense_layer_paths(model: nn.Module, variables: Mapping, xs: jax.Array) -> tuple:
  """Module paths of the `nn.Dense` layers called exactly once per forward pass on one
  example, whose parameters are exactly a 2-D `kernel` (and a `bias`): the layers whose
  Jacobian Gram `param_lipschitz` reads from activations and output cotangents."""
  calls: dict[Path, int] = {}

  def count(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      path = tuple(context.module.path)
      calls[path] = calls.get(path, 0) + 1
    return next_fun(*args, **kwargs)
  clean = {k: v for k, v in variables.items() if k != "norm_stats"}
  with nn.intercept_methods(count):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), clean, xs[:1])
  out = []
  for path, n in calls.items():
    layer = model_info.get_at(variables["params"], path)
    if n == 1 and isinstance(layer, Mapping) and "kernel" in layer and \
        set(layer) <= {"kernel", "bias"} and jnp.ndim(layer["kernel"]) == 2:
      out.append(path)
  return tuple(sorted(out))


def _leaf_grams(model, apply_one, variables, flat_params, xs, x, i, dense_paths):
  """`{"leaves": {leaf path: [m, m] Gram J_leaf J_leaf^T}, "finite", "dtype"}` for one
  example, J_leaf the Jacobian of the m outputs w.r.t. that leaf.

  Dense layers in `dense_paths` (input a `[T, in]` over T positions, T = 1 for a flat
  input; output cotangent g_c `[T, out]` for output c): d f_c / d W = sum_t a_t g_c,t^T,
  so <dW_c, dW_d> = sum_{t,s} (a_t . a_s)(g_c,t . g_d,s) and the bias' Gram is
  (sum_t g_c,t) . (sum_t g_d,t). The output cotangents come from m VJPs w.r.t. a zero
  perturbation added to each Dense output (intercepted), so no per-example weight
  gradient is formed for these layers. Every other leaf: its m VJP rows `[m, size]`
  and their Gram."""
  dense = set(dense_paths)
  dense_leaves = {k for k in flat_params if k[:-1] in dense}
  other = {k: v for k, v in flat_params.items() if k not in dense_leaves}

  def f(sub, deltas):
    acts = {}

    def perturb(next_fun, args, kwargs, context):
      # The method name first: methods of unbound modules (__post_init__ checks) come
      # through here too, and only a bound module has a path.
      path = tuple(context.module.path) if context.method_name == "__call__" else None
      if path not in dense:
        return next_fun(*args, **kwargs)
      acts[path] = args[0]
      return next_fun(*args, **kwargs) + deltas[path]
    params = traverse_util.unflatten_dict({**flat_params, **sub})
    with nn.intercept_methods(perturb):
      y = apply_one({**variables, "params": params}, xs, x, i)
    return ravel_pytree(y)[0], acts

  def shapes(deltas):   # the Dense output shapes, from a trace with scalar perturbations
    return jax.eval_shape(lambda d: f(other, d)[1], deltas)
  acts_shape = shapes({p: jnp.zeros((), x.dtype) for p in dense_paths})
  zeros = {p: jnp.zeros(acts_shape[p].shape[:-1] +
                        (flat_params[p + ("kernel",)].shape[1],), x.dtype)
           for p in dense_paths}
  y, vjp, acts = jax.vjp(f, other, zeros, has_aux=True)
  eye = jnp.eye(y.size, dtype=y.dtype)
  d_other, d_out = jax.vmap(vjp)(eye)
  grams = {}
  for k, j in d_other.items():
    j = j.reshape(y.size, -1)
    grams[k] = jnp.matmul(j, j.T, precision=HIGHEST)
  for p in dense_paths:
    a = acts[p].reshape(-1, acts[p].shape[-1])               # [T, in]
    g = d_out[p].reshape(y.size, a.shape[0], -1)             # [m, T, out]
    t, n_in, n_out = a.shape[0], a.shape[1], g.shape[2]
    if t * t * y.size <= n_in * n_out:   # few positions: Gram from inner products
      aa = jnp.matmul(a, a.T, precision=HIGHEST)                # [T, T]
      gg = jnp.einsum("cto,dso->cdts", g, g, precision=HIGHEST)  # [m, m, T, T]
      grams[p + ("kernel",)] = jnp.einsum("ts,cdts->cd", aa, gg, precision=HIGHEST)
    else:   # many positions: the m kernel gradients themselves are smaller
      dw = jnp.einsum("ti,cto->cio", a, g, precision=HIGHEST).reshape(y.size, -1)
      grams[p + ("kernel",)] = jnp.matmul(dw, dw.T, precision=HIGHEST)
    if p + ("bias",) in flat_params:
      gs = jnp.sum(g, axis=1)
      grams[p + ("bias",)] = jnp.matmul(gs, gs.T, precision=HIGHEST)
  return {"leaves": grams, "finite": jnp.all(jnp.isfinite(y)), "dtype": y.dtype}


@functools.partial(jax.jit, static_argnames=("model", "mode", "method", "num_iters",
                                             "tol", "batch_size", "groups", "dense_paths"))
def _param_impl(model, variables, xs, keys, *, mode, method, num_iters, tol, batch_size,
                groups, dense_paths=()):
  variables = prepare_variables(model, variables, xs, mode)
  apply_one = example_apply(model, mode)
  flat_params = traverse_util.flatten_dict(dict(variables["params"]))

  def f_of(sub: dict, x, i):
    params = traverse_util.unflatten_dict({**flat_params, **sub})
    return ravel_pytree(apply_one({**variables, "params": params}, xs, x, i))[0]

  def one(args):
    x, i, key = args
    if method == "jacrev":
      grams = _leaf_grams(model, apply_one, variables, flat_params, xs, x, i, dense_paths)
      total = _exact_meta(_gram_norm(sum(grams["leaves"].values())), grams["finite"],
                          method, grams["dtype"])
      per = {g: _exact_meta(_gram_norm(sum(grams["leaves"][k] for k in ks)),
                            grams["finite"], method, grams["dtype"]) for g, ks in groups}
      return total, per

    def norm_over(leaf_keys, k):
      sub = {lk: flat_params[lk] for lk in leaf_keys}
      vec, unravel = ravel_pytree(sub)
      return spectral_norm_flat(lambda v: f_of(unravel(v), x, i), vec, method,
                                num_iters=num_iters, tol=tol, key=k)[0]
    total = norm_over(tuple(flat_params), key)
    per = {g: norm_over(ks, jax.random.fold_in(key, gi)) for gi, (g, ks) in enumerate(groups)}
    return total, per

  return _map(one, (xs, jnp.arange(xs.shape[0]), keys), batch_size)


def param_lipschitz(model: nn.Module, variables: Mapping, xs: jax.Array, *,
                    bn_mode: Optional[str] = None, per_layer: bool = False,
                    method: str = "auto", num_iters: int = 100, tol: float = 1e-6,
                    key=None, batch_size: Optional[int] = None,
                    max_jacobian_bytes: int = DEFAULT_MAX_JACOBIAN_BYTES,
                    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES
                    ) -> ParamLipschitzResult:
  """Local parameter Lipschitz constants `||J_theta f(x_i; theta)||_2` per example.

  theta is `variables["params"]` flattened into one vector (BN running statistics are
  not parameters). With `per_layer=True` also the norm of the Jacobian w.r.t. each
  group of `param_groups` (each Linear / Norm layer of `structure()`), the other
  parameters fixed. Note `max_g ||J_g|| <= ||J|| <= sqrt(sum_g ||J_g||^2)`.

  method "auto": for few outputs (10 logits) "jacrev" — m VJPs give J as per-leaf
  blocks `[m, ...]` and the norm is read from the `m x m` Gram matrix (never P x P);
  matrix-free Lanczos when `m * P` floats exceed `max_jacobian_bytes`.
  Other arguments as in `input_lipschitz`. Returns a `ParamLipschitzResult`.
  """
  check_method(method)
  check_iterative_args(num_iters, tol)
  mode = model_info.resolve_bn_mode(model, variables, bn_mode)
  xs = jnp.asarray(xs)
  if "params" not in variables:
    raise ValueError(f"variables has no 'params' collection (keys: {sorted(variables)})")
  out_dim, act = model_info.check_batch(model, variables, xs)
  n = xs.shape[0]
  num_params = sum(p.size for p in jax.tree.leaves(variables["params"]))
  itemsize = jax.tree.leaves(variables["params"])[0].dtype.itemsize
  method = resolve_method(method, num_params, out_dim, itemsize, max_jacobian_bytes)
  groups = tuple(param_groups(model, variables["params"]).items()) if per_layer else ()
  if batch_size is None:
    act *= n if mode == "batch_coupled" else 1
    per = act * _products(method, num_params, out_dim) + num_params * out_dim * itemsize
    batch_size = _chunk(n, per, max_memory_bytes)
  dense = dense_layer_paths(model, variables, xs) if method == "jacrev" else ()
  total, per = _param_impl(model, variables, xs, _keys(key, n),
                           mode=mode, method=method, num_iters=num_iters, tol=float(tol),
                           batch_size=batch_size, groups=groups, dense_paths=dense)
  check_finite(total, "param_lipschitz")
  return ParamLipschitzResult(total=total, per_layer=per)
