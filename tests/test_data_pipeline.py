"""The input pipeline: shapes, determinism, host sharding, resume, eval coverage,
standardization, augmentation, and the validation errors."""
import json

import numpy as np
import pytest

from lipnorm.data import Dataset, clear_cache, get_dataset
from lipnorm.data.augment import crop_and_flip
from lipnorm.data.splits import make_splits
from tests import data_writers as w


def _indexed_splits(n_train=100, n_test=37, shape=(4, 4, 3), num_classes=10):
  """Images whose first two pixel bytes encode the example's index (identity tracking)."""
  rng = np.random.default_rng(0)

  def make(n, offset):
    x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8).reshape(n, -1)
    ids = np.arange(n) + offset
    x[:, 0], x[:, 1] = ids // 256, ids % 256
    return x.reshape((n,) + shape), ids % num_classes
  return make_splits("indexed", make(n_train, 0), make(n_test, 0), num_classes)


def _dataset(splits=None, *, batch_size=20, eval_batch_size=24, devices=2, process_index=0,
             process_count=1, seed=0, augment=False, standardize=False, num_train=None,
             num_test=None, prefetch=2):
  return Dataset(splits or _indexed_splits(), seed=seed, batch_size=batch_size,
                 eval_batch_size=eval_batch_size, num_local_devices=devices,
                 process_index=process_index, process_count=process_count,
                 augment=augment, standardize=standardize, num_train=num_train,
                 num_test=num_test, prefetch=prefetch)


def _batch_ids(batch):
  """Example indices encoded in a batch of unstandardized, unaugmented images."""
  x = batch["image"]
  flat = np.round(x.reshape((-1,) + x.shape[-3:]) * 255).astype(np.int64).reshape(
      -1, int(np.prod(x.shape[-3:])))
  return flat[:, 0] * 256 + flat[:, 1]


def test_train_batch_shapes_dtypes_and_labels():
  ds = _dataset(devices=4, batch_size=20)
  b = next(ds.train_iterator(prefetch=0))
  assert b["image"].shape == (4, 5, 4, 4, 3) and b["image"].dtype == np.float32
  assert b["label"].shape == (4, 5) and b["label"].dtype == np.int32
  np.testing.assert_array_equal(b["label"].ravel(), _batch_ids(b) % 10)
  assert ds.steps_per_epoch == 5 and ds.per_device_batch_size == 5


def test_epochs_visit_distinct_examples_in_new_orders():
  ds = _dataset(batch_size=30)          # 100 examples -> 3 steps, 10 dropped per epoch
  it = ds.train_iterator()
  epochs = [np.concatenate([_batch_ids(next(it)) for _ in range(3)]) for _ in range(3)]
  it.close()
  for ids in epochs:
    assert len(ids) == 90 and len(set(ids.tolist())) == 90 and ids.max() < 100
  assert not np.array_equal(epochs[0], epochs[1])
  again = _dataset(batch_size=30).train_batch(1, 2)          # pure in (seed, epoch, step)
  np.testing.assert_array_equal(_batch_ids(again), epochs[1][60:])
  other_seed = _dataset(batch_size=30, seed=1).train_batch(0, 0)
  assert not np.array_equal(_batch_ids(other_seed), epochs[0][:30])


@pytest.mark.parametrize("augment", [False, True])
def test_two_hosts_split_every_global_batch(augment):
  splits = _indexed_splits(shape=(8, 8, 3))
  one = _dataset(splits, batch_size=20, devices=2, augment=augment)
  hosts = [_dataset(splits, batch_size=20, devices=2, process_index=p, process_count=2,
                    augment=augment) for p in range(2)]
  assert hosts[0].local_batch_size == 10 and hosts[0].per_device_batch_size == 5
  seen = []
  for step in range(one.steps_per_epoch):
    full = one.train_batch(0, step)
    parts = [h.train_batch(0, step) for h in hosts]
    for key in ("image", "label"):  # host p holds rows [10p, 10p + 10) of the global batch
      whole = full[key].reshape((20,) + full[key].shape[2:])
      got = np.concatenate([p[key].reshape((10,) + p[key].shape[2:]) for p in parts])
      np.testing.assert_array_equal(got, whole)
    if not augment:
      ids = [set(_batch_ids(p).tolist()) for p in parts]
      assert not ids[0] & ids[1]
      seen += sorted(ids[0] | ids[1])
  if not augment:  # the epoch is covered exactly once (drop remainder: 100 = 5 * 20)
    assert sorted(seen) == list(range(100))


def test_resume_from_json_state_gives_the_same_batches():
  ds = _dataset(batch_size=20, augment=True, splits=_indexed_splits(shape=(8, 8, 3)))
  it = ds.train_iterator()                 # prefetching thread ahead of the caller
  for _ in range(7):                       # crosses the epoch boundary (5 steps/epoch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert (state["epoch"], state["step"]) == (1, 2)
  expected = [next(it) for _ in range(6)]
  it.close()
  for prefetch in (0, 3):
    resumed = ds.train_iterator(state, prefetch=prefetch)
    for want in expected:
      got = next(resumed)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])
    resumed.close()
  fresh = _restarted(ds).train_iterator(state, prefetch=1)
  np.testing.assert_array_equal(next(fresh)["image"], expected[0]["image"])
  fresh.close()


def _restarted(ds):
  """A new Dataset object with the same configuration (as after a restart)."""
  return _dataset(batch_size=ds.batch_size, augment=ds.augment,
                  splits=_indexed_splits(shape=(8, 8, 3)))


def test_resume_rejects_a_state_from_another_configuration():
  ds = _dataset()
  state = ds.train_iterator(prefetch=0).get_state()
  with pytest.raises(ValueError, match=r"iterator state has seed=0 but this dataset has "
                     r"seed=5"):
    _dataset(seed=5).train_iterator(state)
  with pytest.raises(ValueError, match=r"batch_size=20 but this dataset has batch_size=40"):
    _dataset(batch_size=40).train_iterator(state)
  with pytest.raises(ValueError, match=r"step=9 must be an int in \[0, 5\)"):
    ds.train_iterator({"epoch": 0, "step": 9})


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_counts_every_example_exactly_once(process_count):
  ids, labels, counts = [], [], []
  for p in range(process_count):
    ds = _dataset(batch_size=12 * process_count, eval_batch_size=12 * process_count,
                  devices=4, process_index=p,
                  process_count=process_count)
    n = 0
    for b in ds.eval_batches("test"):
      assert b["image"].shape == (4, 3, 4, 4, 3) and b["mask"].shape == (4, 3)
      mask = b["mask"].ravel().astype(bool)
      ids += _batch_ids(b)[mask].tolist()
      labels += b["label"].ravel()[mask].tolist()
      assert not b["image"].reshape(12, -1)[~mask].any()    # padding rows are zeros
      n += 1
    counts.append(n)
    assert n == ds.num_eval_batches("test")
  assert len(set(counts)) == 1            # every process runs the same number of steps
  assert sorted(ids) == list(range(37))   # 37 test examples, each exactly once
  assert sorted(labels) == sorted((np.arange(37) % 10).tolist())


def test_eval_on_train_split_is_unaugmented_and_complete():
  ds = _dataset(augment=True, eval_batch_size=16)
  ids = np.concatenate([_batch_ids(b)[b["mask"].ravel() > 0] for b in ds.eval_batches("train")])
  assert sorted(ids.tolist()) == list(range(100))
  with pytest.raises(ValueError, match="unknown split 'valid'; valid splits: train, test"):
    next(ds.eval_batches("valid"))


def test_probe_batch_and_standardization_against_numpy():
  splits = _indexed_splits(shape=(4, 4, 3))
  ds = _dataset(splits, standardize=True)
  x = splits.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(ds.info.mean, x.mean((0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(ds.info.std, x.std((0, 1, 2)), rtol=1e-12)
  probe = ds.probe_batch(100)
  assert probe["image"].shape == (100, 4, 4, 3) and probe["label"].dtype == np.int32
  np.testing.assert_allclose(probe["image"], (x - ds.info.mean) / ds.info.std, atol=1e-5)
  np.testing.assert_allclose(probe["image"].mean((0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(probe["image"].std((0, 1, 2)), 1, atol=1e-5)
  np.testing.assert_array_equal(ds.probe_batch(7, split="test")["label"], np.arange(7) % 10)
  with pytest.raises(ValueError, match=r"probe_batch n=101 must be an integer in \[1, 100\]"):
    ds.probe_batch(101)


def test_subsets_take_the_first_examples():
  ds = _dataset(num_train=40, num_test=9, batch_size=20)
  assert (ds.info.num_train, ds.info.num_test, ds.steps_per_epoch) == (40, 9, 2)
  ids = np.concatenate([_batch_ids(ds.train_batch(0, s)) for s in range(2)])
  assert sorted(ids.tolist()) == list(range(40))
  with pytest.raises(ValueError, match=r"data.num_test=38 exceeds the 37 examples"):
    _dataset(num_test=38)


def test_crop_and_flip_matches_a_padded_reference():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (64, 6, 5, 2), dtype=np.uint8)
  dy, dx = rng.integers(0, 7, 64), rng.integers(0, 7, 64)
  flip = rng.random(64) < 0.5
  got = crop_and_flip(images, dy, dx, flip, pad=3)
  for i in range(64):
    padded = np.pad(images[i], ((3, 3), (3, 3), (0, 0)))
    ref = padded[dy[i]:dy[i] + 6, dx[i]:dx[i] + 5]
    np.testing.assert_array_equal(got[i], ref[:, ::-1] if flip[i] else ref)


def _write_small_cifar(tmp_path):
  rng = np.random.default_rng(7)
  parts = [(w.random_images(rng, 8), rng.integers(0, 10, 8)) for _ in range(5)]
  w.write_cifar10(tmp_path, parts, (w.random_images(rng, 6), rng.integers(0, 10, 6)))
  return np.concatenate([p[0] for p in parts])


def test_cifar_augmentation_is_on_by_default_and_is_a_crop_flip(tmp_path):
  clear_cache()
  raw = _write_small_cifar(tmp_path)
  cfg = {"source": "cifar10", "data_dir": str(tmp_path), "batch_size": 8,
         "standardize": False}
  ds = get_dataset(cfg, seed=3, num_local_devices=2, process_index=0, process_count=1)
  plain = get_dataset({**cfg, "augment": False}, seed=3, num_local_devices=2,
                      process_index=0, process_count=1)
  assert ds.augment and not plain.augment
  aug_x = ds.train_batch(0, 1)["image"].reshape(-1, 32, 32, 3)
  plain_x = plain.train_batch(0, 1)["image"].reshape(-1, 32, 32, 3)
  assert not np.array_equal(aug_x, plain_x)
  np.testing.assert_array_equal(ds.train_batch(0, 1)["image"].reshape(-1, 32, 32, 3), aug_x)
  originals = np.round(plain_x * 255).astype(np.uint8)
  augmented = np.round(aug_x * 255).astype(np.uint8)
  for orig, out in zip(originals, augmented):  # some crop offset and flip explains each
    padded = np.pad(orig, ((4, 4), (4, 4), (0, 0)))
    crops = [padded[a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
    assert any(np.array_equal(out, c) or np.array_equal(out, c[:, ::-1]) for c in crops)
  digits = get_dataset({"source": "digits", "batch_size": 8}, seed=0, num_local_devices=1,
                       process_index=0, process_count=1)
  assert not digits.augment
  assert raw.shape == (40, 32, 32, 3)


def test_get_dataset_validation_errors():
  base = {"source": "digits", "batch_size": 32}
  kw = dict(seed=0, num_local_devices=4, process_index=0, process_count=2)
  with pytest.raises(ValueError, match=r"data.batch_size=36 is not divisible by "
                     r"process_count \* num_local_devices = 2 \* 4 = 8"):
    get_dataset({**base, "batch_size": 36}, **kw)
  with pytest.raises(ValueError, match=r"data.eval_batch_size=12 is not divisible"):
    get_dataset({**base, "eval_batch_size": 12}, **kw)
  with pytest.raises(ValueError, match=r"data.batch_size=0 must be a positive integer"):
    get_dataset({**base, "batch_size": 0}, **kw)
  with pytest.raises(ValueError, match=r"process_index=2 must be an int in \[0, 2\)"):
    get_dataset(base, **{**kw, "process_index": 2})
  with pytest.raises(ValueError, match=r"data.augment='yes' must be True, False or None"):
    get_dataset({**base, "augment": "yes"}, **kw)
  with pytest.raises(ValueError, match=r"data.batch_size=2048 exceeds the 1438 training "
                     r"examples of 'digits'"):
    get_dataset({**base, "batch_size": 2048}, **kw)


def test_get_dataset_with_config_dict_and_jax_topology():
  ml_collections = pytest.importorskip("ml_collections")
  import jax
  cfg = ml_collections.ConfigDict({"source": "digits", "data_dir": None, "batch_size": 32,
                                   "eval_batch_size": 64, "augment": None,
                                   "standardize": True, "num_train": None,
                                   "num_test": None})
  ds = get_dataset(cfg, seed=0, num_local_devices=jax.local_device_count())
  assert ds.process_index == jax.process_index() and ds.process_count == jax.process_count()
  assert ds.info.image_shape == (8, 8, 1) and ds.info.num_classes == 10
  assert (ds.info.num_train, ds.info.num_test) == (1438, 359)
  n = sum(b["mask"].sum() for b in ds.eval_batches("test"))
  assert n == 359


def test_close_stops_the_prefetch_thread_and_errors_reach_the_caller():
  ds = _dataset()
  it = ds.train_iterator(prefetch=2)
  next(it)
  it.close()
  assert not it._thread.is_alive()
  with pytest.raises(StopIteration):
    next(it)

  class Broken(Dataset):
    def train_batch(self, epoch, step, perm=None):
      raise RuntimeError("decode failed")
  broken = Broken(_indexed_splits(), seed=0, batch_size=20, eval_batch_size=20,
                  num_local_devices=1, process_index=0, process_count=1, augment=False,
                  standardize=False, num_train=None, num_test=None)
  with pytest.raises(RuntimeError, match="decode failed"):
    next(broken.train_iterator(prefetch=2))
