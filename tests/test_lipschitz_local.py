"""input_lipschitz / param_lipschitz against explicitly formed float64 Jacobians, known
answers (linear nets, the a*P construction, docs/theory.md#c2) and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from lipnorm.lipschitz import input_lipschitz, param_groups, param_lipschitz
from lipnorm.models import get_model
from lipschitz_testing import (explicit_norms, f64_model,  # noqa: F401
                               random_variables, x64)


# (norm, norm_options, bn_mode): every normalizer a dense net can carry non-trivially
# (instance norm on [N, D] normalizes single features: a constant map; see the CNN tests)
CONFIGS = [("none", None, None), ("layer", None, None), ("group", {"num_groups": 2}, None),
           ("rms", None, None), ("batch", None, "eval"), ("batch", None, "batch_fixed"),
           ("batch", None, "batch_coupled")]


def _net(norm, opts, seed=0, depth=4, **kw):
  return f64_model(get_model, "relu_net", key=seed, input_shape=(6,), depth=depth, width=8,
                   num_classes=5, norm=norm, norm_options=opts, **kw)


def _reference_fn(model, v, xs, bn_mode):
  """`f(x, i)`: example i's output at input x, by definition (independent of the
  engine's code path)."""
  if bn_mode == "batch_coupled":
    return lambda x, i: model.apply(v, xs.at[i].set(x), use_batch_stats=True)[i]
  if bn_mode == "batch_fixed":
    _, st = model.apply(v, xs, use_batch_stats=True, mutable=["norm_stats"])
    bs = {k: {"mean": s["mean"], "var": s["var"]} for k, s in st["norm_stats"].items()}
    v = {**v, "batch_stats": bs}
  return lambda x, i: model.apply(v, x[None])[0]


@pytest.mark.parametrize("norm,opts,bn_mode", CONFIGS)
@pytest.mark.slow
def test_input_lipschitz_matches_explicit_svd(x64, norm, opts, bn_mode):
  model, v = _net(norm, opts)
  xs = jax.random.normal(jax.random.key(1), (5, 6), jnp.float64)
  ref = explicit_norms(_reference_fn(model, v, xs, bn_mode), xs)
  exact = input_lipschitz(model, v, xs, bn_mode=bn_mode)
  assert exact.method == "jacrev" and bool(jnp.all(exact.converged))
  np.testing.assert_allclose(np.asarray(exact.value), ref, rtol=1e-6)
  it = input_lipschitz(model, v, xs, bn_mode=bn_mode, method="lanczos", tol=1e-10)
  assert bool(jnp.all(it.converged))
  np.testing.assert_allclose(np.asarray(it.value), ref, rtol=1e-8)


@pytest.mark.slow
def test_every_method_and_chunking_agree(x64):
  model, v = _net("layer", None, seed=3)
  xs = jax.random.normal(jax.random.key(2), (5, 6), jnp.float64)
  ref = explicit_norms(_reference_fn(model, v, xs, None), xs)
  for method, tol in (("jacfwd", 1e-6), ("power", 1e-5)):
    res = input_lipschitz(model, v, xs, method=method, tol=1e-11, num_iters=2000)
    np.testing.assert_allclose(np.asarray(res.value), ref, rtol=tol, err_msg=method)
  chunked = input_lipschitz(model, v, xs, batch_size=2)
  np.testing.assert_allclose(np.asarray(chunked.value), ref, rtol=1e-6)


def test_batch_fixed_against_handwritten_jacobian(x64):
  """BN with this batch's statistics held fixed: J = W_L D G W_{L-1} ... D G W_1 with
  G = diag(gamma / sqrt(batch var + eps)) and D the ReLU masks, written out in NumPy."""
  model, v = _net("batch", None, seed=5)
  xs = np.asarray(jax.random.normal(jax.random.key(3), (7, 6), jnp.float64))
  p = v["params"]
  h, gains, masks = xs, [], []
  for i in range(3):
    z = h @ np.asarray(p[f"dense_{i}"]["kernel"])
    mean, var = z.mean(0), z.var(0)
    g = np.asarray(p[f"norm_{i}"]["scale"]) / np.sqrt(var + 1e-5)
    y = (z - mean) * g + np.asarray(p[f"norm_{i}"]["bias"])
    gains.append(g)
    masks.append(y > 0)
    h = np.maximum(y, 0)
  ref = []
  for n in range(xs.shape[0]):
    jac = np.eye(6)
    for i in range(3):
      jac = (np.asarray(p[f"dense_{i}"]["kernel"]).T @ jac) * (gains[i] * masks[i][n])[:, None]
    jac = np.asarray(p["dense_3"]["kernel"]).T @ jac
    ref.append(np.linalg.svd(jac, compute_uv=False)[0])
  res = input_lipschitz(model, v, jnp.asarray(xs), bn_mode="batch_fixed")
  np.testing.assert_allclose(np.asarray(res.value), ref, rtol=1e-6)
  # batch statistics really are held fixed: differs from the coupled Jacobian
  coupled = input_lipschitz(model, v, jnp.asarray(xs), bn_mode="batch_coupled")
  assert not np.allclose(np.asarray(coupled.value), ref, rtol=1e-3)


@pytest.mark.parametrize("norm,opts,bn_mode,iterative", [
    CONFIGS[0] + (False,), CONFIGS[1] + (True,), CONFIGS[6] + (False,)])
@pytest.mark.slow
def test_param_lipschitz_matches_explicit_svd(x64, norm, opts, bn_mode, iterative):
  model, v = _net(norm, opts, seed=1, depth=3)
  xs = jax.random.normal(jax.random.key(4), (3, 6), jnp.float64)
  flat, unravel = ravel_pytree(v["params"])
  leaves = traverse_util.flatten_dict(v["params"])
  # column ranges of each leaf in the flat vector (ravel_pytree order = sorted leaves)
  offsets, start = {}, 0
  for path in sorted(leaves):
    offsets[path] = (start, start + leaves[path].size)
    start += leaves[path].size
  groups = param_groups(model, v["params"])
  fn = _reference_fn(model, v, xs, bn_mode)

  def out(q, i):
    return _reference_fn(model, {**v, "params": unravel(q)}, xs, bn_mode)(xs[i], i)
  jacs = np.asarray(jax.jit(jax.vmap(jax.jacrev(out), in_axes=(None, 0)))(
      flat, jnp.arange(xs.shape[0])), np.float64)
  del fn
  exact = param_lipschitz(model, v, xs, bn_mode=bn_mode, per_layer=True)
  assert exact.total.method == "jacrev"
  assert set(exact.per_layer) == set(groups)
  np.testing.assert_allclose(np.asarray(exact.value),
                             np.linalg.svd(jacs, compute_uv=False)[:, 0], rtol=1e-6)
  for g, paths in groups.items():
    cols = np.concatenate([np.arange(*offsets[p]) for p in paths])
    ref = np.linalg.svd(jacs[:, :, cols], compute_uv=False)[:, 0]
    np.testing.assert_allclose(np.asarray(exact.per_layer[g].value), ref, rtol=1e-6)
  if iterative:
    it = param_lipschitz(model, v, xs, bn_mode=bn_mode, per_layer=True, method="lanczos",
                         tol=1e-11, num_iters=300)
    np.testing.assert_allclose(np.asarray(it.value), np.asarray(exact.value), rtol=1e-8)
    for g in groups:
      np.testing.assert_allclose(np.asarray(it.per_layer[g].value),
                                 np.asarray(exact.per_layer[g].value), rtol=1e-8)


def test_linear_network_equals_norm_of_matrix_product(x64):
  model, v = f64_model(get_model, "relu_net", key=2, input_shape=(6,), depth=4, width=9,
                       num_classes=4, activation="identity", use_bias=False)
  prod = np.eye(6)
  for i in range(4):
    prod = prod @ np.asarray(v["params"][f"dense_{i}"]["kernel"])
  ref = np.linalg.svd(prod, compute_uv=False)[0]
  xs = jax.random.normal(jax.random.key(0), (4, 6), jnp.float64)
  res = input_lipschitz(model, v, xs)
  np.testing.assert_allclose(np.asarray(res.value), ref, rtol=1e-9)


@pytest.mark.parametrize("a,depth", [(1.5, 6), (3.0, 4)])
def test_permutation_construction_gives_a_to_the_L(x64, a, depth):
  """docs/theory.md#c2: W_l = a P_l, no bias; on the positive orthant Lip_x = a^L exactly."""
  d = 5
  model, v = f64_model(get_model, "relu_net", input_shape=(d,), depth=depth, width=d,
                       num_classes=d, use_bias=False)
  rng = np.random.default_rng(0)
  params = {f"dense_{i}": {"kernel": jnp.asarray(a * np.eye(d)[rng.permutation(d)])}
            for i in range(depth)}
  v = {"params": params}
  xs = jnp.asarray(rng.uniform(0.1, 2.0, size=(6, d)))
  res = input_lipschitz(model, v, xs)
  np.testing.assert_allclose(np.asarray(res.value), a ** depth, rtol=1e-12)


def test_auto_uses_reverse_mode_for_cifar_input():
  model = get_model("relu_net", depth=2, width=8, num_classes=10)
  xs = jnp.ones((2, 32, 32, 3))
  v = random_variables(model, (32, 32, 3))
  assert input_lipschitz(model, v, xs).method == "jacrev"


@pytest.mark.slow
def test_bad_input():
  model = get_model("relu_net", depth=3, width=8, num_classes=3, norm="batch")
  xs = jax.random.normal(jax.random.key(0), (4, 6))
  v = random_variables(model, (6,))
  with pytest.raises(ValueError, match="bn_mode is required.*'eval', 'batch_fixed', "
                                       "'batch_coupled'"):
    input_lipschitz(model, v, xs)
  with pytest.raises(ValueError, match="bn_mode='train'; allowed"):
    param_lipschitz(model, v, xs, bn_mode="train")
  with pytest.raises(ValueError, match=r"xs of shape \(4, 7\) does not fit"):
    input_lipschitz(model, v, jnp.ones((4, 7)), bn_mode="eval")
  with pytest.raises(ValueError, match="non-finite values"):
    input_lipschitz(model, v, xs.at[1, 2].set(jnp.nan), bn_mode="eval")
  bad = jax.tree.map(lambda a: a, v)
  bad["params"]["dense_2"]["kernel"] = bad["params"]["dense_2"]["kernel"].at[0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match="non-finite model outputs"):
    input_lipschitz(model, bad, xs, bn_mode="eval")
  with pytest.raises(ValueError, match="method='svd'"):
    input_lipschitz(model, v, xs, bn_mode="eval", method="svd")


CNN_NORMS = [("none", None, None, False), ("batch", None, "eval", False),
             ("batch", None, "batch_coupled", True), ("layer", None, None, True),
             ("group", {"num_groups": 2}, None, False), ("instance", None, None, False),
             ("rms", None, None, False)]


@pytest.mark.parametrize("norm,opts,bn_mode,iterative", CNN_NORMS)
@pytest.mark.slow
def test_cnn_input_lipschitz_matches_explicit_svd(x64, norm, opts, bn_mode, iterative):
  model, v = f64_model(get_model, "cnn", key=2, input_shape=(6, 6, 2), widths=(4, 4),
                       convs_per_stage=1, num_classes=3, norm=norm, norm_options=opts,
                       downsample="strided_conv")
  xs = jax.random.normal(jax.random.key(5), (3, 6, 6, 2), jnp.float64)
  ref = explicit_norms(_reference_fn(model, v, xs, bn_mode), xs)
  exact = input_lipschitz(model, v, xs, bn_mode=bn_mode)
  assert exact.method == "jacrev"
  np.testing.assert_allclose(np.asarray(exact.value), ref, rtol=1e-6)
  if iterative:
    it = input_lipschitz(model, v, xs, bn_mode=bn_mode, method="lanczos", tol=1e-10)
    np.testing.assert_allclose(np.asarray(it.value), ref, rtol=1e-8)


def test_auto_never_uses_forward_mode_for_a_cifar_resnet():
  model = get_model("resnet18", stage_sizes=(1,), width=4, num_classes=10)
  xs = jnp.ones((1, 32, 32, 3))
  v = random_variables(model, (32, 32, 3))
  res = input_lipschitz(model, v, xs, bn_mode="eval")
  assert res.method == "jacrev" and res.value.shape == (1,)


@pytest.mark.slow
def test_param_lipschitz_of_a_cnn_matches_explicit_svd(x64):
  """Conv kernels (per-leaf VJP rows) and the Dense head (activation x cotangent Gram)
  together, against the float64 SVD of the explicitly formed parameter Jacobian."""
  from lipnorm.lipschitz.local import dense_layer_paths
  model, v = f64_model(get_model, "cnn", key=3, input_shape=(6, 6, 2), num_classes=3,
                       widths=(2, 3), norm="layer")
  xs = jax.random.normal(jax.random.key(5), (2, 6, 6, 2), jnp.float64)
  assert dense_layer_paths(model, v, xs)          # the Dense fast path is exercised
  flat, unravel = ravel_pytree(v["params"])
  jacs = jax.vmap(jax.jacrev(lambda q, x: model.apply({**v, "params": unravel(q)}, x[None],
                                                      train=False)[0]),
                  in_axes=(None, 0))(flat, xs)
  ref = np.linalg.svd(np.asarray(jacs, np.float64), compute_uv=False)[:, 0]
  res = param_lipschitz(model, v, xs)
  assert res.total.method == "jacrev" and bool(np.all(res.total.converged))
  np.testing.assert_allclose(np.asarray(res.value), ref, rtol=1e-9)


def test_normalizer_stats_compiles_once_per_model_and_shape():
  from lipnorm.lipschitz import normalizer_stats
  from lipnorm.lipschitz.bounds import _sown_norm_stats
  xs = jax.random.normal(jax.random.key(0), (4, 6))
  before = None
  for seed in range(3):   # equal (not identical) models, new variables each time
    model = get_model("relu_net", depth=2, width=4, num_classes=3, norm="layer")
    v = random_variables(model, (6,), seed)
    stats = normalizer_stats(model, v, xs)
    assert stats and all(np.all(np.asarray(s) > 0) for s in stats.values())
    size = _sown_norm_stats._cache_size()
    assert before is None or size == before
    before = size
