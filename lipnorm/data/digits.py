"""The embedded offline default: scikit-learn's bundled handwritten digits.

1797 real 8x8 grayscale images (pixel values 0..16), 10 classes; shipped inside
scikit-learn, so it needs no download. The train/test split is a fixed stratified
split: within each class, a permutation from a constant seed sends
`round(test_fraction * class_count)` images to test. It does not depend on the run's
seed, so every run and every process sees the same split.
"""
from __future__ import annotations

import numpy as np

from lipnorm.data.splits import Splits, make_splits

SPLIT_SEED = 20251102  # constant: the split is part of the dataset's definition


def load(test_fraction: float = 0.2) -> Splits:
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"digits_test_fraction={test_fraction!r} must lie in (0, 1)")
  from sklearn.datasets import load_digits  # lazy: sklearn import is slow
  bunch = load_digits()
  images = bunch.images.astype(np.uint8)[..., None]      # [1797, 8, 8, 1], 0..16
  labels = bunch.target.astype(np.int32)
  rng = np.random.default_rng(SPLIT_SEED)
  is_test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    is_test[idx[:int(round(test_fraction * len(idx)))]] = True
  return make_splits(
      "digits", (images[~is_test], labels[~is_test]), (images[is_test], labels[is_test]),
      10, image_shape=(8, 8, 1), pixel_max=16,
      class_names=tuple(str(c) for c in range(10)))
