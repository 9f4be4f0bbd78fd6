"""lower_bound_search (validity and soundness against the bound) and
hessian_top_eigenvalues (against an explicit float64 Hessian)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lipnorm.lipschitz import (hessian_top_eigenvalues, input_lipschitz, lower_bound_search,
                               merge_stats, normalizer_stats, upper_bound)
from lipnorm.models import get_model
from lipschitz_testing import f64_model, random_variables, x64  # noqa: F401



@pytest.mark.parametrize("norm,gradient", [("none", "smoothed"), ("layer", "autodiff")])
@pytest.mark.slow
def test_search_is_a_valid_sound_lower_bound(norm, gradient):
  model = get_model("relu_net", depth=3, width=12, num_classes=4, norm=norm)
  xs = jax.random.normal(jax.random.key(0), (6, 5))
  v = random_variables(model, (5,), 1)
  res = lower_bound_search(model, v, xs, steps=15, gradient=gradient, learning_rate=0.05)
  # never below the start; history non-decreasing; value is the exact local constant at
  # the returned input (hence a lower bound of the global constant)
  assert float(res.value) >= float(jnp.max(res.initial)) * (1 - 1e-6)
  assert np.all(np.diff(np.asarray(res.history)) >= 0)
  at_input = input_lipschitz(model, v, res.input[None]).value[0]
  np.testing.assert_allclose(float(res.value), float(at_input), rtol=1e-5)
  # soundness: the bound (stats over the data and the searched inputs) is above it
  stats = merge_stats(normalizer_stats(model, v, xs), normalizer_stats(model, v, res.inputs))
  rep = upper_bound(model, v, input_shape=(5,), stats=stats if norm != "none" else None)
  assert float(res.value) <= rep.normalized_bound * (1 + 1e-5)


@pytest.mark.slow
def test_search_improves_and_respects_constraints():
  """From the same start, a piecewise-linear net's local constant goes up (smoothed
  ascent), and the ball / box constraints hold."""
  model = get_model("relu_net", depth=4, width=16, num_classes=10)
  xs = jax.random.normal(jax.random.key(1), (8, 10))
  v = random_variables(model, (10,))
  res = lower_bound_search(model, v, xs, steps=30, learning_rate=0.05, radius=1.0,
                           box=(-2.5, 2.5))
  assert float(res.value) > float(jnp.max(res.initial))
  dist = jnp.linalg.norm((res.inputs - xs).reshape(8, -1), axis=1)
  assert float(jnp.max(dist)) <= 1.0 + 1e-5
  moved = jnp.any(res.inputs != xs, axis=1)
  assert float(jnp.max(jnp.abs(res.inputs[moved]))) <= 2.5
  with pytest.raises(ValueError, match="gradient='newton'"):
    lower_bound_search(model, v, xs, gradient="newton")
  with pytest.raises(ValueError, match="box="):
    lower_bound_search(model, v, xs, box=(1.0, -1.0))


@pytest.mark.slow
def test_hessian_top_eigenvalues_match_explicit_hessian(x64):
  model, v = f64_model(get_model, "relu_net", input_shape=(5,), depth=3, width=6,
                       num_classes=3, norm="layer", activation="tanh")
  xs = jax.random.normal(jax.random.key(1), (8, 5), jnp.float64)
  ys = jnp.arange(8) % 3

  def loss(params, batch):
    x, y = batch
    logp = jax.nn.log_softmax(model.apply({"params": params}, x))
    return -jnp.mean(logp[jnp.arange(y.shape[0]), y])
  flat, unravel = ravel_pytree(v["params"])
  hess = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f), (xs, ys))))(flat))
  ref = np.linalg.eigvalsh(hess)[::-1]
  lz = hessian_top_eigenvalues(loss, v["params"], (xs, ys), k=3, tol=1e-10, num_iters=100)
  assert bool(lz.converged) and lz.method == "lanczos"
  np.testing.assert_allclose(np.asarray(lz.eigenvalues), ref[:3], rtol=1e-8)
  assert np.all(np.asarray(lz.residuals) <= 1e-9)
  top = ravel_pytree(jax.tree.map(lambda a: a[0], lz.eigenvectors))[0]
  np.testing.assert_allclose(hess @ np.asarray(top), ref[0] * np.asarray(top), atol=1e-7)
  pw = hessian_top_eigenvalues(loss, v["params"], (xs, ys), k=1, method="power", tol=1e-13,
                               num_iters=3000)
  np.testing.assert_allclose(float(pw.eigenvalues[0]), ref[0], rtol=1e-7)
  with pytest.raises(ValueError, match="method='cg'"):
    hessian_top_eigenvalues(loss, v["params"], (xs, ys), method="cg")
  with pytest.raises(ValueError, match="k=0"):
    hessian_top_eigenvalues(loss, v["params"], (xs, ys), k=0)
  with pytest.raises(ValueError, match="not finite"):
    hessian_top_eigenvalues(loss, v["params"], (xs * jnp.nan, ys))


@pytest.mark.slow
def test_search_stays_in_ball_and_box_when_starts_lie_outside_the_box():
  """Clipping a ball projection leaves the ball when the start is outside the box; the
  exact projection onto their intersection does not. An empty intersection is refused."""
  model = get_model("relu_net", depth=3, width=8, num_classes=4)
  xs = jnp.array([[3.0, 0.0, -2.9, 0.5], [0.2, -0.1, 0.0, 2.8]])
  v = random_variables(model, (4,))
  res = lower_bound_search(model, v, xs, steps=20, learning_rate=0.5, radius=1.0,
                           box=(-2.5, 2.5))
  dist = jnp.linalg.norm(res.inputs - xs, axis=1)
  assert float(jnp.max(dist)) <= 1.0 + 1e-5
  moved = jnp.any(res.inputs != xs, axis=1)
  assert bool(jnp.any(moved))
  assert float(jnp.max(jnp.abs(res.inputs[moved]))) <= 2.5 + 1e-6
  with pytest.raises(ValueError, match=r"xs\[0\] lies .* farther than radius=0.1"):
    lower_bound_search(model, v, xs, radius=0.1, box=(-2.5, 2.5))
