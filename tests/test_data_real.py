"""The real datasets in ../shared/data (skipped where absent): counts, balance, published
channel means, image/label alignment, and the pipeline's coverage on them."""
import functools
import tarfile

import numpy as np
import pytest

from lipnorm.data import LoadRequest, get_dataset, load_splits


@functools.lru_cache(maxsize=None)
def _load(name: str, folder: str):
  """Decoded once per test session (the loader's own cache may be cleared by others)."""
  return load_splits(name, LoadRequest(data_dir=folder))


def _cifar10(shared_data):
  return _load("cifar10", str(shared_data / "cifar10"))


@pytest.mark.slow
def test_cifar10_counts_balance_and_published_means(shared_data):
  s = _cifar10(shared_data)
  assert s.train_images.shape == (50000, 32, 32, 3) and s.test_images.shape == (10000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(s.train_labels, minlength=10), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(s.test_labels, minlength=10), [1000] * 10)
  means = s.test_images.reshape(-1, 3).mean(0, dtype=np.float64) / 255
  np.testing.assert_allclose(means, [0.4942, 0.4851, 0.4504], atol=1e-3)
  assert s.class_names[:3] == ("airplane", "automobile", "bird")


@pytest.mark.slow
def test_cifar10_labels_match_the_archive_bytes_and_images_look_like_classes(shared_data):
  s = _cifar10(shared_data)
  archive = shared_data / "cifar10" / "cifar-10-binary.tar.gz"
  with tarfile.open(archive, "r:gz") as tar:  # independent read: every 3073rd byte
    for member in tar:
      if member.name.endswith("test_batch.bin"):
        head = tar.extractfile(member).read(3073 * 50)
        break
  np.testing.assert_array_equal(s.test_labels[:50], list(head[::3073]))
  np.testing.assert_array_equal(s.test_images[0, 0, :4, 0], list(head[1:5]))       # red
  np.testing.assert_array_equal(s.test_images[0, 0, :4, 2], list(head[2049:2053]))  # blue
  # Sky and sea: airplanes and ships are the only classes bluer than they are red.
  x = s.test_images.reshape(10000, -1, 3).mean(1)
  blue_minus_red = [np.mean(x[s.test_labels == c, 2] - x[s.test_labels == c, 0])
                    for c in range(10)]
  assert set(np.argsort(blue_minus_red)[-2:]) == {0, 8}


@pytest.mark.parametrize("name,least_ink", [("mnist", 1), ("fashion_mnist", 5)])
def test_idx_datasets_counts_and_alignment(shared_data, name, least_ink):
  s = _load(name, str(shared_data / name))
  assert s.train_images.shape == (60000, 28, 28, 1) and s.test_images.shape == (10000, 28, 28, 1)
  counts = np.bincount(s.train_labels, minlength=10)
  assert counts.min() > 5000 and counts.sum() == 60000
  if name == "fashion_mnist":
    np.testing.assert_array_equal(counts, [6000] * 10)
  # The digit "1" (MNIST) and the sandal (Fashion-MNIST) have the least ink.
  ink = [s.train_images[s.train_labels == c].mean() for c in range(10)]
  assert int(np.argmin(ink)) == least_ink


def test_cifar10_pipeline_two_hosts_and_eval_on_real_data(shared_data):
  _cifar10(shared_data)  # warm the loader cache
  cfg = {"source": "cifar10", "data_dir": str(shared_data / "cifar10"), "batch_size": 512,
         "eval_batch_size": 1024}
  hosts = [get_dataset(cfg, seed=0, num_local_devices=4, process_index=p, process_count=2)
           for p in range(2)]
  info = hosts[0].info
  assert (info.num_train, info.num_test, info.image_shape) == (50000, 10000, (32, 32, 3))
  np.testing.assert_allclose(info.mean, [0.4914, 0.4822, 0.4465], atol=1e-3)
  np.testing.assert_allclose(info.std, [0.2470, 0.2435, 0.2616], atol=1e-3)
  assert hosts[0].augment and hosts[0].steps_per_epoch == 97
  b = hosts[0].train_batch(0, 0)
  assert b["image"].shape == (4, 64, 32, 32, 3) and b["label"].shape == (4, 64)
  labels, total = [], 0.0
  for h in hosts:
    for batch in h.eval_batches("test"):
      mask = batch["mask"].ravel() > 0
      labels += batch["label"].ravel()[mask].tolist()
      total += batch["mask"].sum()
  assert total == 10000
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)
