"""Every normalizer against an independent float64 NumPy implementation (written here
with explicit loops over the normalization groups), the statistics it sows, BatchNorm's
running-statistics update and its cross-device (pmap) statistics, and registry errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipnorm.normalizers import (NORM_STATS, BatchNorm, channel_groups, get_normalizer,
                                 lipschitz_factor, normalizer_names)

EPS = 1e-3   # larger than the default so a wrong epsilon placement shows


# ---------------------------------------------------------------------------------------
# float64 references

def _affine(u, gamma, beta):
  return u * gamma + beta


def np_batchnorm(x, gamma, beta, eps, mean=None, var=None):
  """Per channel over batch and positions; `mean`/`var` given = eval mode."""
  x = np.asarray(x, np.float64)
  c = x.shape[-1]
  y = np.empty_like(x)
  batch_mean, batch_var = np.empty(c), np.empty(c)
  for j in range(c):
    vals = x[..., j].ravel()
    batch_mean[j] = vals.sum() / vals.size
    batch_var[j] = ((vals - batch_mean[j]) ** 2).sum() / vals.size
    m = batch_mean[j] if mean is None else mean[j]
    v = batch_var[j] if var is None else var[j]
    y[..., j] = gamma[j] * (x[..., j] - m) / np.sqrt(v + eps) + beta[j]
  return y, batch_mean, batch_var


def np_groupnorm(x, groups, gamma, beta, eps):
  """Per sample and per group of C/groups consecutive channels (and all positions)."""
  x = np.asarray(x, np.float64)
  n, c = x.shape[0], x.shape[-1]
  size = c // groups
  y = np.empty_like(x)
  means, variances = np.empty((n, groups)), np.empty((n, groups))
  for i in range(n):
    for g in range(groups):
      block = x[i, ..., g * size:(g + 1) * size]
      m = block.mean()
      v = ((block - m) ** 2).mean()
      means[i, g], variances[i, g] = m, v
      y[i, ..., g * size:(g + 1) * size] = (block - m) / np.sqrt(v + eps)
  return _affine(y, gamma, beta), means, variances


def np_rmsnorm(x, gamma, beta, eps):
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  y = np.empty_like(x)
  ms, means, variances = np.empty(n), np.empty(n), np.empty(n)
  for i in range(n):
    ms[i] = (x[i] ** 2).mean()
    means[i] = x[i].mean()
    variances[i] = ((x[i] - means[i]) ** 2).mean()
    y[i] = x[i] / np.sqrt(ms[i] + eps)
  return _affine(y, gamma, beta), means, variances, ms


# ---------------------------------------------------------------------------------------
# helpers

SHAPES = {"dense": (6, 12), "conv": (3, 4, 5, 12)}


def _input(shape, seed=0):
  # Non-zero mean and non-unit spread, different per channel, so every statistic matters.
  x = jax.random.normal(jax.random.key(seed), shape)
  return 2.0 + jnp.linspace(0.5, 3.0, shape[-1]) * x


def _with_affine(variables, c, use_bias=True, seed=1):
  """Replaces the identity-initialized scale/bias by non-trivial values."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"scale": 0.5 + jax.random.uniform(k1, (c,)) * 2.0}
  if use_bias:
    params["bias"] = jax.random.normal(k2, (c,))
  return {**variables, "params": params}


def _close(a, b, rtol=2e-5, atol=2e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------
# BatchNorm

@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.slow
def test_batchnorm_train_mode_uses_batch_statistics(layout):
  x = _input(SHAPES[layout])
  c = x.shape[-1]
  bn = get_normalizer("batch", epsilon=EPS, momentum=0.8)()
  variables = _with_affine(bn.init(jax.random.key(0), x), c)
  ra_mean = jax.random.normal(jax.random.key(3), (c,))
  ra_var = 0.5 + jax.random.uniform(jax.random.key(4), (c,))
  variables["batch_stats"] = {"mean": ra_mean, "var": ra_var}
  y, updates = bn.apply(variables, x, use_batch_stats=True,
                        mutable=["batch_stats", NORM_STATS])
  gamma, beta = (np.asarray(variables["params"][k], np.float64) for k in ("scale", "bias"))
  y_ref, mean, var = np_batchnorm(x, gamma, beta, EPS)
  _close(y, y_ref)
  sown = updates[NORM_STATS]
  _close(sown["mean"], mean)
  _close(sown["var"], var)
  _close(sown["sigma2"], var)
  # Running statistics: ra <- momentum * ra + (1 - momentum) * batch statistic
  # (the population variance of the batch).
  _close(updates["batch_stats"]["mean"], 0.8 * np.asarray(ra_mean, np.float64) + 0.2 * mean)
  _close(updates["batch_stats"]["var"], 0.8 * np.asarray(ra_var, np.float64) + 0.2 * var)


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.slow
def test_batchnorm_eval_mode_uses_running_statistics(layout):
  x = _input(SHAPES[layout])
  c = x.shape[-1]
  bn = get_normalizer("batch", epsilon=EPS)()
  variables = _with_affine(bn.init(jax.random.key(0), x), c)
  ra_mean = np.asarray(jax.random.normal(jax.random.key(3), (c,)), np.float64)
  ra_var = np.asarray(0.5 + jax.random.uniform(jax.random.key(4), (c,)), np.float64)
  variables["batch_stats"] = {"mean": jnp.asarray(ra_mean, jnp.float32),
                              "var": jnp.asarray(ra_var, jnp.float32)}
  y, updates = bn.apply(variables, x, use_batch_stats=False,
                        mutable=["batch_stats", NORM_STATS])
  gamma, beta = (np.asarray(variables["params"][k], np.float64) for k in ("scale", "bias"))
  y_ref, mean, var = np_batchnorm(x, gamma, beta, EPS, mean=ra_mean, var=ra_var)
  _close(y, y_ref)
  # Eval mode never moves the running statistics, even when they are mutable.
  chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
  sown = updates[NORM_STATS]
  _close(sown["mean"], mean)          # what the input looked like ...
  _close(sown["var"], var)
  _close(sown["sigma2"], ra_var)      # ... and what the layer divided by
  # Eval-mode BN is a per-channel affine map; its Lipschitz constant (the spectral norm
  # of the Jacobian of one example, a diagonal matrix) is the normalizer factor.
  one = x[:1].reshape(1, -1)
  f = lambda v: bn.apply(variables, v.reshape((1,) + x.shape[1:]), use_batch_stats=False)
  jac = np.asarray(jax.jacfwd(lambda v: f(v).ravel())(one[0]), np.float64)
  expected = np.max(np.abs(gamma) / np.sqrt(ra_var + EPS))
  _close(np.linalg.svd(jac, compute_uv=False)[0], expected, rtol=1e-5)
  _close(lipschitz_factor(variables["params"]["scale"], ra_var, EPS), expected, rtol=1e-5)


def test_batchnorm_init_does_not_move_running_statistics():
  x = _input(SHAPES["conv"])
  variables = get_normalizer("batch")().init(jax.random.key(0), x)
  chex.assert_trees_all_equal(variables["batch_stats"],
                              {"mean": jnp.zeros(12), "var": jnp.ones(12)})


@pytest.mark.slow
def test_batchnorm_axis_name_gives_global_batch_statistics():
  devices = jax.local_devices()
  assert len(devices) == 4, "tests/conftest.py provides 4 simulated CPU devices"
  x = _input((4, 5, 3, 3, 6))                       # [devices, per-device batch, H, W, C]
  synced = BatchNorm(epsilon=EPS, axis_name="batch")   # models set it from bn_axis_name
  local = get_normalizer("batch", epsilon=EPS)()
  variables = _with_affine(local.init(jax.random.key(0), x[0]), 6)
  gamma, beta = (np.asarray(variables["params"][k], np.float64) for k in ("scale", "bias"))

  def run(module):
    return jax.pmap(
        lambda v, xs: module.apply(v, xs, use_batch_stats=True,
                                   mutable=["batch_stats", NORM_STATS]),
        axis_name="batch", in_axes=(None, 0))(variables, x)

  y, updates = run(synced)
  y_ref, mean, var = np_batchnorm(x.reshape((20, 3, 3, 6)), gamma, beta, EPS)
  _close(y.reshape(y_ref.shape), y_ref)
  for d in range(4):   # every device sees and stores the global statistics
    _close(updates[NORM_STATS]["mean"][d], mean)
    _close(updates[NORM_STATS]["var"][d], var)
    _close(updates["batch_stats"]["var"][d], 0.9 + 0.1 * var)

  y, updates = run(local)   # without axis_name: each device its own statistics
  for d in range(4):
    y_ref, mean, var = np_batchnorm(x[d], gamma, beta, EPS)
    _close(y[d], y_ref)
    _close(updates[NORM_STATS]["mean"][d], mean)
  assert not np.allclose(updates[NORM_STATS]["mean"][0], updates[NORM_STATS]["mean"][1])


# ---------------------------------------------------------------------------------------
# per-sample normalizers

GROUPINGS = [
    ("layer", {}, 1),
    ("group", {"num_groups": 3}, 3),
    ("group", {"group_size": 2}, 6),
    ("instance", {}, 12),
]


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("name,options,groups", GROUPINGS)
def test_groupwise_normalizers_match_numpy(name, options, groups, layout):
  if name == "instance" and layout == "dense":
    pytest.skip("single-value groups are refused (test_single_value_groups_are_refused)")
  x = _input(SHAPES[layout])
  norm = get_normalizer(name, epsilon=EPS, **options)()
  variables = _with_affine(norm.init(jax.random.key(0), x), x.shape[-1])
  assert "batch_stats" not in variables
  gamma, beta = (np.asarray(variables["params"][k], np.float64) for k in ("scale", "bias"))
  for mode in (False, True):   # train and eval are the same for per-sample statistics
    y, updates = norm.apply(variables, x, use_batch_stats=mode, mutable=[NORM_STATS])
    y_ref, mean, var = np_groupnorm(x, groups, gamma, beta, EPS)
    _close(y, y_ref)
    sown = updates[NORM_STATS]
    chex.assert_shape([sown["mean"], sown["var"], sown["sigma2"]], (x.shape[0], groups))
    _close(sown["mean"], mean)
    _close(sown["var"], var)
    _close(sown["sigma2"], var)


@pytest.mark.parametrize("layout", list(SHAPES))
def test_rmsnorm_matches_numpy(layout):
  x = _input(SHAPES[layout])
  norm = get_normalizer("rms", epsilon=EPS, use_bias=True)()
  variables = _with_affine(norm.init(jax.random.key(0), x), x.shape[-1])
  gamma, beta = (np.asarray(variables["params"][k], np.float64) for k in ("scale", "bias"))
  y, updates = norm.apply(variables, x, mutable=[NORM_STATS])
  y_ref, mean, var, ms = np_rmsnorm(x, gamma, beta, EPS)
  _close(y, y_ref)
  sown = updates[NORM_STATS]
  chex.assert_shape([sown["mean"], sown["var"], sown["sigma2"]], (x.shape[0],))
  _close(sown["mean"], mean)
  _close(sown["var"], var)
  _close(sown["sigma2"], ms)
  # Default RMSNorm: scale only, no bias.
  assert set(get_normalizer("rms")().init(jax.random.key(0), x)["params"]) == {"scale"}


@pytest.mark.slow
def test_layernorm_local_lipschitz_is_below_the_factor():
  """||J N(u)||_2 <= max|gamma| / sqrt(var(u) + eps) at u (docs/theory.md#normalizer-factor)."""
  x = _input((1, 12))
  norm = get_normalizer("layer", epsilon=EPS)()
  variables = _with_affine(norm.init(jax.random.key(0), x), 12)
  jac = jax.jacfwd(lambda u: norm.apply(variables, u[None])[0])(x[0])
  local = np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)[0]
  _, _, var = np_groupnorm(x, 1, np.ones(12), np.zeros(12), EPS)
  factor = float(lipschitz_factor(variables["params"]["scale"], var, EPS))
  assert local <= factor * (1 + 1e-5)
  assert local >= 0.5 * factor   # and not vacuous: the removed mean is one direction


def test_sown_stats_only_when_requested_and_none_is_identity():
  x = _input(SHAPES["conv"])
  norm = get_normalizer("group", num_groups=4)()
  variables = norm.init(jax.random.key(0), x)
  assert NORM_STATS not in variables        # init sows nothing (all collections mutable)
  out = norm.apply(variables, x)            # not mutable: nothing sown, plain output
  assert isinstance(out, jax.Array)
  ident = get_normalizer("none")()
  variables = ident.init(jax.random.key(0), x)
  assert variables == {}
  chex.assert_trees_all_equal(ident.apply(variables, x, use_batch_stats=False), x)


def test_groupnorm_default_picks_largest_divisor_up_to_32():
  for c, expected in [(12, 12), (40, 20), (48, 24), (64, 32), (96, 32), (7, 7), (66, 22)]:
    x = jnp.ones((2, 3, 3, c))
    norm = get_normalizer("group")()
    variables = jax.eval_shape(norm.init, jax.random.key(0), x)
    _, updates = jax.eval_shape(lambda v, x: norm.apply(v, x, mutable=[NORM_STATS]),
                                variables, x)
    assert updates[NORM_STATS]["mean"].shape == (2, expected), c


# ---------------------------------------------------------------------------------------
# registry errors

def test_registry_names_and_errors():
  assert normalizer_names() == ["batch", "group", "instance", "layer", "none", "rms"]
  with pytest.raises(ValueError, match="unknown normalizer 'batchnorm'; valid names: batch, "
                                       "group, instance, layer, none, rms"):
    get_normalizer("batchnorm")
  with pytest.raises(ValueError, match=r"'layer' does not take option\(s\) \['num_groups'\]; "
                                       r"allowed: \['epsilon'"):
    get_normalizer("layer", num_groups=2)
  with pytest.raises(ValueError, match=r"'none' does not take option\(s\) \['epsilon'\]"):
    get_normalizer("none", epsilon=1e-3)
  with pytest.raises(ValueError, match="num_groups=0 must be a positive integer"):
    get_normalizer("group", num_groups=0)
  with pytest.raises(ValueError, match="num_groups or group_size, not both"):
    get_normalizer("group", num_groups=2, group_size=2)
  with pytest.raises(ValueError, match="epsilon=0.0 must be > 0"):
    get_normalizer("batch", epsilon=0.0)
  with pytest.raises(ValueError, match=r"momentum=1.0 must be in \[0, 1\)"):
    get_normalizer("batch", momentum=1.0)
  with pytest.raises(ValueError, match=r"'batch' does not take option\(s\) \['axis_name'\]"):
    get_normalizer("batch", axis_name="batch")   # the model's bn_axis_name sets it
  assert [channel_groups(n, 12, **o) for n, o in [("layer", {}), ("instance", {}),
                                                   ("group", {"num_groups": 3}),
                                                   ("group", {}), ("batch", {}), ("rms", {})]
          ] == [1, 12, 3, 12, None, None]


@pytest.mark.parametrize("name,options,shape", [
    ("instance", {}, (2, 12)),                 # dense: each feature alone
    ("group", {"num_groups": 12}, (2, 12)),
    ("layer", {}, (2, 1)),                     # a width-1 dense layer
    ("instance", {}, (2, 1, 1, 12)),           # 1x1 spatial: again single values
])
def test_single_value_groups_are_refused(name, options, shape):
  """Centering a group of one value gives 0: the output would be constant (the bias)."""
  norm = get_normalizer(name, **options)()
  with pytest.raises(ValueError, match="zero variance and the network output is constant"):
    norm.init(jax.random.key(0), jnp.ones(shape))
  if shape[-1] > 1:   # RMS does not center: a single value is fine
    get_normalizer("rms")().init(jax.random.key(0), jnp.ones(shape))


@pytest.mark.parametrize("options,match", [
    ({"num_groups": 5}, r"num_groups=5 does not divide 12 channels; allowed num_groups: "
                        r"\[1, 2, 3, 4, 6, 12\]"),
    ({"group_size": 5}, r"group_size=5 does not divide 12 channels; allowed group sizes: "
                        r"\[1, 2, 3, 4, 6, 12\]"),
])
def test_groupnorm_impossible_groups_name_the_channels(options, match):
  norm = get_normalizer("group", **options)()
  with pytest.raises(ValueError, match=match):
    norm.init(jax.random.key(0), jnp.ones((2, 12)))
