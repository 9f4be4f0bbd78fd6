"""The embedded offline default: scikit-learn's bundled handwritten digits.

1797 real 8x8 grayscale images (pixel values 0..16), 10 classes; shipped inside
scikit-learn, so it needs no download. The train/test split is a fixed stratified
split: within each class, a permutation from a constant seed sends
`round(test_fraction * class_count)` images to test. It does not depend on the run's
seed, so every run and every process sees the same split.
"""
from __future__ import annotations

import gzip
import importlib.util
import pathlib

import numpy as np

from lipnorm.data.splits import Splits, make_splits

SPLIT_SEED = 20251102  # constant: the split is part of the dataset's definition


def _bundled_csv() -> pathlib.Path | None:
  """scikit-learn's `datasets/data/digits.csv.gz`, found without importing sklearn."""
  spec = importlib.util.find_spec("sklearn")
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = pathlib.Path(root) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
      return path
  return None


def read_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [1797, 8, 8], labels int32 [1797]): the rows of scikit-learn's
  bundled CSV (64 pixels, then the label), the arrays `load_digits()` returns.

  The CSV is read directly: importing `sklearn.datasets` (scipy.stats with it) costs
  about 1.2 s of every train.py start. `load_digits` is the fallback if a scikit-learn
  release moves the file."""
  path = _bundled_csv()
  if path is None:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int32)
  with gzip.open(path, "rt") as f:
    data = np.loadtxt(f, delimiter=",", dtype=np.float64)
  return data[:, :-1].reshape(-1, 8, 8).astype(np.uint8), data[:, -1].astype(np.int32)


def load(test_fraction: float = 0.2) -> Splits:
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"digits_test_fraction={test_fraction!r} must lie in (0, 1)")
  images, labels = read_digits()
  images = images[..., None]                              # [1797, 8, 8, 1], 0..16
  rng = np.random.default_rng(SPLIT_SEED)
  is_test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    is_test[idx[:int(round(test_fraction * len(idx)))]] = True
  return make_splits(
      "digits", (images[~is_test], labels[~is_test]), (images[is_test], labels[is_test]),
      10, image_shape=(8, 8, 1), pixel_max=16,
      class_names=tuple(str(c) for c in range(10)))
