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


def random_variables(model, input_shape, seed=0, dtype=jnp.float32):
  """Variables of `model` for inputs `[N, *input_shape]` drawn with NumPy (no XLA compile
  of an init function): kernels He-normal (fan-in), biases N(0, 0.1^2), normalizer
  gains U(0.5, 1.5), BN running means N(0, 0.5^2) and variances U(0.2, 2)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, *input_shape), dtype))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if path[0].key == "batch_stats":
      value = rng.normal(0, 0.5, shape) if name == "mean" else rng.uniform(0.2, 2.0, shape)
    elif name == "kernel":
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0, 0.1, shape)
    return jnp.asarray(value, dtype)
  shapes = {k: v for k, v in shapes.items() if k != "norm_stats"}
  return jax.tree_util.tree_map_with_path(draw, shapes)


def f64_model(model_fn, name, key=0, input_shape=(6,), **kwargs):
  """(model, float64 variables) for `get_model(name, dtype=float64, **kwargs)`."""
  model = model_fn(name, dtype=jnp.float64, **kwargs)
  return model, random_variables(model, input_shape, key, jnp.float64)
