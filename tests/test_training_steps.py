"""pmap train/eval steps against single-device computations over the same global batch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lipnorm.training import base_config, build_model, create_train_state, make_optimizer
from lipnorm.training.distributed import first_replica, replicate
from lipnorm.training.steps import cross_entropy, make_steps


D = 4           # simulated devices (tests/conftest.py)
PER_DEVICE = 4
DIM, CLASSES = 6, 3


def _config(bn_stats, norm="batch"):
  c = base_config()
  c.model.depth, c.model.width, c.model.norm = 3, 8, norm
  c.bn_stats = bn_stats
  c.optimizer.learning_rate, c.optimizer.momentum = 0.1, 0.0   # plain SGD: p - lr * g
  c.schedule.name = "constant"
  return c


def _global_batch():
  """Device d's shard is shifted by 3*d, so per-device and global statistics differ a lot."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(D, PER_DEVICE, DIM)).astype(np.float32)
  x += 3.0 * np.arange(D, dtype=np.float32)[:, None, None]
  y = rng.integers(0, CLASSES, size=(D, PER_DEVICE)).astype(np.int32)
  return {"image": x, "label": y}


def _reference_step(config, host_state, images, labels):
  """Single-device loss, grads and new running stats for one batch (no axis_name)."""
  config = config.copy_and_resolve_references()
  config.bn_stats = "per_device"   # the same model without a pmap axis
  model = build_model(config, CLASSES)

  def loss_fn(params):
    logits, upd = model.apply({"params": params, "batch_stats": host_state.batch_stats},
                              images, train=True, mutable=["batch_stats"])
    return cross_entropy(logits, labels, CLASSES).mean(), upd["batch_stats"]

  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(host_state.params)
  return loss, grads, stats


def _pmap_step(config, batch):
  model = build_model(config, CLASSES)
  tx = make_optimizer(config, 10)
  host_state = jax.device_get(create_train_state(model, tx, (DIM,), seed=0))
  p_train, _ = make_steps(config, model, tx, CLASSES)
  new_state, metrics = p_train(replicate(host_state), batch)
  return host_state, new_state, metrics


def _assert_replicas_identical(tree):
  for leaf in jax.tree.leaves(tree):
    arr = np.asarray(leaf)
    for d in range(1, arr.shape[0]):
      np.testing.assert_array_equal(arr[d], arr[0])


@pytest.mark.slow
def test_global_bn_matches_single_device_on_global_batch():
  config, batch = _config("global"), _global_batch()
  host_state, new_state, metrics = _pmap_step(config, batch)
  images = batch["image"].reshape(D * PER_DEVICE, DIM)
  loss, grads, stats = _reference_step(config, host_state, images, batch["label"].ravel())
  _assert_replicas_identical(new_state.batch_stats)
  _assert_replicas_identical(new_state.params)
  chex_tree_close(first_replica(new_state.batch_stats), stats, rtol=1e-5, atol=1e-6)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, host_state.params, grads)
  chex_tree_close(first_replica(new_state.params), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics["loss"]), float(loss), rtol=1e-5)


@pytest.mark.slow
def test_per_device_bn_averages_shard_statistics():
  config, batch = _config("per_device"), _global_batch()
  host_state, new_state, metrics = _pmap_step(config, batch)
  refs = [_reference_step(config, host_state, batch["image"][d], batch["label"][d])
          for d in range(D)]
  mean = lambda trees: jax.tree.map(lambda *xs: np.mean(np.stack(xs), 0), *trees)
  _assert_replicas_identical(new_state.batch_stats)
  _assert_replicas_identical(new_state.params)
  chex_tree_close(first_replica(new_state.batch_stats), mean([r[2] for r in refs]),
                  rtol=1e-5, atol=1e-6)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, host_state.params,
                          mean([r[1] for r in refs]))
  chex_tree_close(first_replica(new_state.params), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics["loss"]),
                             np.mean([float(r[0]) for r in refs]), rtol=1e-5)
  # The two scopes really differ here (shards have different means): the averaged
  # per-device variance misses the between-shard spread the global variance contains.
  _, global_state, _ = _pmap_step(_config("global"), batch)
  var_pd = first_replica(new_state.batch_stats)["norm_0"]["var"]
  var_gl = first_replica(global_state.batch_stats)["norm_0"]["var"]
  assert np.all(var_gl > var_pd + 1e-3)


@pytest.mark.slow
def test_gradients_are_global_batch_gradients_without_bn():
  config, batch = _config("global", norm="layer"), _global_batch()
  host_state, new_state, metrics = _pmap_step(config, batch)
  model = build_model(config, CLASSES)
  images, labels = batch["image"].reshape(-1, DIM), batch["label"].ravel()
  loss_fn = lambda p: cross_entropy(model.apply({"params": p}, images), labels, CLASSES).mean()
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(host_state.params)
  assert new_state.batch_stats == {}
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, host_state.params, grads)
  chex_tree_close(first_replica(new_state.params), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics["grad_norm"]), optax.tree.norm(grads),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(metrics["loss"]), loss, rtol=1e-5)


def test_eval_step_masks_padding():
  config = _config("global")
  model = build_model(config, CLASSES)
  tx = make_optimizer(config, 10)
  host_state = jax.device_get(create_train_state(model, tx, (DIM,), seed=0))
  _, p_eval = make_steps(config, model, tx, CLASSES)
  batch = _global_batch()
  mask = np.ones((D, PER_DEVICE), np.float32)
  mask[-1, 1:] = 0.0                               # 3 padded rows on the last device
  batch["image"][-1, 1:] = 1e3                     # garbage that must not count
  sums = first_replica(p_eval(replicate(host_state), {**batch, "mask": mask}))
  keep = mask.ravel() > 0
  logits = jax.jit(model.apply)(host_state.variables(), batch["image"].reshape(-1, DIM)[keep])
  labels = batch["label"].ravel()[keep]
  assert float(sums["count"]) == keep.sum()
  np.testing.assert_allclose(float(sums["loss_sum"]),
                             float(cross_entropy(logits, labels, CLASSES).sum()), rtol=1e-5)
  assert float(sums["correct"]) == float(np.sum(np.argmax(logits, -1) == labels))


def test_label_smoothing_matches_formula():
  logits = jnp.array([[2.0, -1.0, 0.5]])
  eps = 0.2
  logp = jax.nn.log_softmax(logits)[0]
  target = np.full(3, eps / 3)
  target[0] += 1 - eps
  np.testing.assert_allclose(cross_entropy(logits, jnp.array([0]), 3, eps)[0],
                             -np.sum(target * logp), rtol=1e-6)


def chex_tree_close(actual, expected, rtol, atol):
  import chex
  chex.assert_trees_all_close(jax.tree.map(np.asarray, actual),
                              jax.tree.map(np.asarray, expected), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_mixed_precision_step_keeps_float32_params(dtype):
  config = _config("global")
  config.dtype = dtype
  host_state, new_state, metrics = _pmap_step(config, _global_batch())
  for leaf in jax.tree.leaves(new_state.params):
    assert leaf.dtype == jnp.float32
  assert np.isfinite(np.asarray(metrics["loss"])).all()
