"""Shared helpers of the tests/test_lipschitz_*.py files (independent references)."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@contextlib.contextmanager
def enable_x64():
  """float64 JAX inside the block; restores the previous setting."""
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", prev)


@pytest.fixture
def x64():
  with enable_x64():
    yield


def explicit_norm(f, x) -> float:
  """Largest singular value of the explicitly formed Jacobian of f at x (float64 SVD)."""
  jac = np.asarray(jax.jacfwd(lambda v: jnp.ravel(f(v.reshape(x.shape))))(jnp.ravel(x)),
                   np.float64)
  return float(np.linalg.svd(jac.reshape(-1, x.size), compute_uv=False)[0])


def explicit_norms(f, xs) -> np.ndarray:
  """`[N]`: explicit_norm of `x -> f(x, i)` at `xs[i]` for every i (one jit)."""
  jac = jax.jit(jax.vmap(jax.jacfwd(lambda x, i: jnp.ravel(f(x, i)))))(
      xs, jnp.arange(xs.shape[0]))
  jac = np.asarray(jac, np.float64).reshape(xs.shape[0], -1, xs[0].size)
  return np.linalg.svd(jac, compute_uv=False)[:, 0]


def f64_model(model_fn, name, key=0, input_shape=(6,), **kwargs):
  """(model, float64 variables) for `get_model(name, dtype=float64, **kwargs)`."""
  model = model_fn(name, dtype=jnp.float64, **kwargs)
  variables = jax.jit(model.init)(jax.random.key(key),
                                  jnp.zeros((2, *input_shape), jnp.float64))
  variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
  variables = {k: v for k, v in variables.items() if k != "norm_stats"}
  return model, variables


def perturb_norms(variables, seed):
  """Random BN running statistics and normalizer gains (so eval-mode BN is not ~1 and
  some factors exceed 1)."""
  rng = np.random.default_rng(seed)
  out = dict(variables)

  def draw(lo, hi):
    return lambda path, a: jnp.asarray(rng.uniform(lo, hi, a.shape), a.dtype)
  if "batch_stats" in variables:
    out["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda p, a: draw(0.2, 2.0)(p, a) if p[-1].key == "var" else
        draw(-0.5, 0.5)(p, a), variables["batch_stats"])
  out["params"] = jax.tree_util.tree_map_with_path(
      lambda p, a: draw(0.5, 1.5)(p, a) if p[-1].key == "scale" else a, variables["params"])
  return out
