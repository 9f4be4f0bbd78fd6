"""Dataset sources: official formats round-trip exactly, errors are clear, digits, TFDS."""
import io
import pathlib
import tarfile

import numpy as np
import pytest

from lipnorm.data import LoadRequest, clear_cache, dataset_names, get_dataset, load_splits
from lipnorm.data import cifar, idx, locations
from tests import data_writers as w


def _cifar10_arrays(seed=0, per_file=3, n_test=4):
  rng = np.random.default_rng(seed)
  parts = [(w.random_images(rng, per_file), rng.integers(0, 10, per_file)) for _ in range(5)]
  test = (w.random_images(rng, n_test), rng.integers(0, 10, n_test))
  return parts, test


@pytest.fixture(autouse=True)
def _fresh_cache():
  clear_cache()  # every test reads its own files
  yield
  clear_cache()


@pytest.mark.parametrize("archive", [True, False], ids=["tar.gz", "extracted"])
def test_cifar10_round_trip(tmp_path, archive):
  parts, test = _cifar10_arrays()
  w.write_cifar10(tmp_path, parts, test, archive=archive)
  s = load_splits("cifar10", LoadRequest(data_dir=str(tmp_path)))
  np.testing.assert_array_equal(s.train_images, np.concatenate([p[0] for p in parts]))
  np.testing.assert_array_equal(s.train_labels, np.concatenate([p[1] for p in parts]))
  np.testing.assert_array_equal(s.test_images, test[0])
  np.testing.assert_array_equal(s.test_labels, test[1])
  assert s.train_images.dtype == np.uint8 and s.train_labels.dtype == np.int32
  assert s.num_classes == 10 and s.class_names == tuple(f"class{c}" for c in range(10))
  assert not s.train_images.flags.writeable  # the cached arrays cannot be corrupted


def test_cifar10_found_under_name_subfolder_and_as_file(tmp_path):
  parts, test = _cifar10_arrays()
  path = w.write_cifar10(tmp_path / "cifar10", parts, test)
  for data_dir in (tmp_path, path):  # data_dir/<name>/..., or the archive itself
    s = load_splits("cifar10", LoadRequest(data_dir=str(data_dir)))
    np.testing.assert_array_equal(s.test_images, test[0])


@pytest.mark.parametrize("archive", [True, False], ids=["tar.gz", "extracted"])
def test_cifar100_round_trip_uses_fine_labels(tmp_path, archive):
  rng = np.random.default_rng(1)
  train = (w.random_images(rng, 6), rng.integers(0, 100, 6), rng.integers(0, 20, 6))
  test = (w.random_images(rng, 3), rng.integers(0, 100, 3), rng.integers(0, 20, 3))
  w.write_cifar100(tmp_path, train, test, archive=archive)
  s = load_splits("cifar100", LoadRequest(data_dir=str(tmp_path)))
  np.testing.assert_array_equal(s.train_images, train[0])
  np.testing.assert_array_equal(s.train_labels, train[1])
  np.testing.assert_array_equal(s.test_labels, test[1])
  assert s.num_classes == 100


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_round_trip(tmp_path, gz, name):
  rng = np.random.default_rng(2)
  train = (rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5))
  test = (rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3))
  w.write_idx_dataset(tmp_path, train, test, gz=gz)
  s = load_splits(name, LoadRequest(data_dir=str(tmp_path)))
  np.testing.assert_array_equal(s.train_images[..., 0], train[0])
  np.testing.assert_array_equal(s.test_labels, test[1])
  assert s.train_images.shape == (5, 28, 28, 1) and s.name == name


def test_truncated_cifar_archive_names_file_and_size(tmp_path):
  parts, test = _cifar10_arrays()
  path = w.write_cifar10(tmp_path, parts, test)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"cifar-10-binary\.tar\.gz.*truncated or corrupt") as e:
    load_splits("cifar10", LoadRequest(data_dir=str(tmp_path)))
  assert "30730000 bytes" in str(e.value)  # the official member size: 10000 * 3073


def test_cifar_bin_with_partial_record_is_rejected(tmp_path):
  parts, test = _cifar10_arrays()
  folder = w.write_cifar10(tmp_path, parts, test, archive=False)
  raw = (folder / "test_batch.bin").read_bytes()
  (folder / "test_batch.bin").write_bytes(raw[:-100])
  with pytest.raises(ValueError, match=r"test_batch\.bin has \d+ bytes, not a whole number "
                     r"of 3073-byte records"):
    load_splits("cifar10", LoadRequest(data_dir=str(tmp_path)))


def test_cifar_archive_missing_member(tmp_path):
  path = tmp_path / "cifar-10-binary.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
    data = w.cifar_records(np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, int))
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
  with pytest.raises(ValueError, match=r"archive lacks data_batch_1\.bin"):
    load_splits("cifar10", LoadRequest(data_dir=str(tmp_path)))


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_truncated_idx_is_rejected(tmp_path, gz):
  rng = np.random.default_rng(3)
  w.write_idx_dataset(tmp_path, (rng.integers(0, 256, (4, 28, 28)), np.arange(4)),
                      (rng.integers(0, 256, (2, 28, 28)), np.arange(2)), gz=gz)
  name = "train-images-idx3-ubyte" + (".gz" if gz else "")
  data = (tmp_path / name).read_bytes()
  (tmp_path / name).write_bytes(data[:len(data) - 40])
  pattern = "truncated or corrupt"
  with pytest.raises(ValueError, match=f"{name}.*{pattern}"):
    load_splits("mnist", LoadRequest(data_dir=str(tmp_path)))


def test_idx_declared_size_in_message(tmp_path):
  raw = w.idx_bytes(np.zeros((4, 28, 28), np.uint8))
  with pytest.raises(ValueError, match=r"declares shape \(4, 28, 28\), i\.e\. 3152 bytes"):
    idx.parse_idx(raw[:-1], "x")
  with pytest.raises(ValueError, match="not an IDX file"):
    idx.parse_idx(b"\x01\x02\x03\x04", "x")


def test_labels_out_of_range_and_count_mismatch(tmp_path):
  parts, test = _cifar10_arrays()
  test = (test[0], np.array([0, 1, 12, 3]))
  w.write_cifar10(tmp_path / "a", parts, test)
  with pytest.raises(ValueError, match=r"cifar10 test split: label 12 is out of range; "
                     r"labels must lie in \[0, 10\)"):
    load_splits("cifar10", LoadRequest(data_dir=str(tmp_path / "a")))
  rng = np.random.default_rng(4)
  w.write_idx_dataset(tmp_path / "b", (rng.integers(0, 256, (4, 28, 28)), np.arange(3)),
                      (rng.integers(0, 256, (2, 28, 28)), np.arange(2)))
  with pytest.raises(ValueError, match=r"labels have shape \(3,\) but there are 4 images"):
    load_splits("mnist", LoadRequest(data_dir=str(tmp_path / "b")))


def test_idx_wrong_image_shape(tmp_path):
  rng = np.random.default_rng(5)
  w.write_idx_dataset(tmp_path, (rng.integers(0, 256, (4, 16, 16)), np.arange(4)),
                      (rng.integers(0, 256, (2, 16, 16)), np.arange(2)))
  with pytest.raises(ValueError, match=r"image shape \(16, 16, 1\) does not match the "
                     r"expected \(28, 28, 1\)"):
    load_splits("mnist", LoadRequest(data_dir=str(tmp_path)))


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
  monkeypatch.setenv(locations.ENV_VAR, str(tmp_path / "env"))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  with pytest.raises(ValueError) as e:
    load_splits("cifar10", LoadRequest())
  msg = str(e.value)
  assert str(tmp_path / "env" / "cifar10") in msg
  assert str(tmp_path / "home" / ".cache" / "lipnorm" / "cifar10") in msg
  assert cifar.CIFAR10.url in msg and "tfds:cifar10" in msg
  with pytest.raises(ValueError, match=r"dataset 'fashion_mnist' not found offline.*"
                     r"t10k-labels-idx1-ubyte\(\.gz\)"):
    load_splits("fashion_mnist", LoadRequest(data_dir=str(tmp_path / "nothing")))


def test_unknown_source_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown dataset source 'cifar11'; valid names: "
                     r"cifar10, cifar100, digits"):
    get_dataset({"source": "cifar11", "batch_size": 8}, seed=0, num_local_devices=1,
                process_index=0, process_count=1)
  assert {"digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "tfds:cifar10",
          "tfds:svhn_cropped"} <= set(dataset_names())


def test_digits_split_is_fixed_stratified_and_real():
  from sklearn.datasets import load_digits
  s = load_splits("digits")
  assert s.train_images.shape[1:] == (8, 8, 1) and s.pixel_max == 16
  assert len(s.train_labels) + len(s.test_labels) == 1797
  assert abs(len(s.test_labels) / 1797 - 0.2) < 0.01
  counts = np.bincount(load_digits().target, minlength=10)
  np.testing.assert_array_equal(np.bincount(s.test_labels, minlength=10),
                                np.round(0.2 * counts).astype(int))
  # Disjoint and complete: the multiset of (image, label) equals sklearn's.
  ref = load_digits()
  key = lambda x, y: sorted(a.tobytes() + bytes([b]) for a, b in zip(x, y))
  got = key(np.concatenate([s.train_images, s.test_images])[..., 0],
            np.concatenate([s.train_labels, s.test_labels]))
  assert got == key(ref.images.astype(np.uint8), ref.target)
  clear_cache()
  again = load_splits("digits")  # the split is a constant, not a function of run seeds
  np.testing.assert_array_equal(again.test_labels, s.test_labels)


def test_digits_are_read_without_importing_sklearn_and_equal_load_digits(monkeypatch):
  """The bundled CSV read directly gives load_digits()'s arrays in its order (so the
  split is unchanged), as does the fallback; and a fresh process loads the digits
  without importing sklearn (about 1.2 s of every train.py start)."""
  import subprocess
  import sys
  from sklearn.datasets import load_digits
  from lipnorm.data import digits
  ref = load_digits()
  images, labels = digits.read_digits()
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(images, ref.images)
  np.testing.assert_array_equal(labels, ref.target)
  monkeypatch.setattr(digits, "_bundled_csv", lambda: None)
  fb_images, fb_labels = digits.read_digits()
  np.testing.assert_array_equal(fb_images, images)
  np.testing.assert_array_equal(fb_labels, labels)
  code = ("import sys; from lipnorm.data import digits; s = digits.load(); "
          "assert len(s.train_labels) + len(s.test_labels) == 1797; "
          "assert 'sklearn' not in sys.modules, sorted(m for m in sys.modules if 'sklearn' in m)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     cwd=str(pathlib.Path(__file__).resolve().parents[1]))
  assert r.returncode == 0, r.stderr[-2000:]


# ---- TFDS --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,classes", [
    ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100),
    ("mnist", (28, 28, 1), 10), ("fashion_mnist", (28, 28, 1), 10),
    ("svhn_cropped", (32, 32, 3), 10)])
def test_tfds_mock_data(tmp_path, name, shape, classes):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = {"source": f"tfds:{name}", "data_dir": str(tmp_path), "batch_size": 4,
         "standardize": False}
  with tfds.testing.mock_data(num_examples=10):
    ds = get_dataset(cfg, seed=0, num_local_devices=2, process_index=0, process_count=1)
    src = tfds.data_source(name, split="test", data_dir=str(tmp_path), download=False)
    expected = [(src[i]["image"], int(src[i]["label"])) for i in range(10)]
  assert ds.info.image_shape == shape and ds.info.num_classes == classes
  assert ds.info.num_train == ds.info.num_test == 10
  probe = ds.probe_batch(10, split="test")
  np.testing.assert_array_equal(np.round(probe["image"] * 255).astype(np.uint8),
                                np.stack([e[0] for e in expected]))
  np.testing.assert_array_equal(probe["label"], [e[1] for e in expected])
  batch = next(iter(ds.train_iterator(prefetch=0)))
  assert batch["image"].shape == (2, 2) + shape


def test_tfds_real_array_record_without_tensorflow(tmp_path):
  """A real ArrayRecord dataset (prepared here from PNG bytes, which needs no TF) is
  read back by the tfds:cifar10 source with exactly its images and labels."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from PIL import Image
  from tensorflow_datasets.core import registered
  rng = np.random.default_rng(6)
  data = {"train": (w.random_images(rng, 8), rng.integers(0, 10, 8)),
          "test": (w.random_images(rng, 5), rng.integers(0, 10, 5))}

  def png(a):
    f = io.BytesIO()
    Image.fromarray(a).save(f, format="PNG")
    f.seek(0)
    return f

  with registered.skip_registration():
    class LocalCifar10(tfds.image_classification.Cifar10):
      name = "cifar10"

      def _split_generators(self, dl_manager):
        return {s: self._examples(s) for s in data}

      def _examples(self, split):
        for i, (im, label) in enumerate(zip(*data[split])):
          yield i, {"id": f"{split}{i:05d}", "image": png(im), "label": int(label)}

  LocalCifar10(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  s = load_splits("tfds:cifar10", LoadRequest(data_dir=str(tmp_path)))
  for split in ("train", "test"):
    images, labels = s.split(split)
    # TFDS stores examples in a hashed order: compare as multisets of (image, label).
    key = lambda x, y: sorted(a.tobytes() + bytes([int(b)]) for a, b in zip(x, y))
    assert key(images, labels) == key(*data[split])
  assert s.num_classes == 10 and s.train_images.shape == (8, 32, 32, 3)


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError) as e:
    load_splits("tfds:mnist", LoadRequest(data_dir=str(tmp_path / "tfds")))
  msg = str(e.value)
  assert "not available offline" in msg and str(tmp_path / "tfds") in msg
  assert f"tfds build mnist --data_dir={tmp_path / 'tfds'} --file_format=array_record" in msg
