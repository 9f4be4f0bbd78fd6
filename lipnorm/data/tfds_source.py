"""TensorFlow Datasets image classification datasets, read without TensorFlow.

`tfds.data_source(name, split=..., data_dir=..., download=False)` gives random access
to a dataset prepared once in the ArrayRecord file format (decoding with NumPy/PIL,
no TensorFlow). Each split is decoded into memory once: the supported datasets are
small (SVHN, the largest, is about 300 MB as uint8).

Preparing a dataset needs network (and, for `tfds build`, TensorFlow) once:
  pip install tensorflow tensorflow-datasets
  tfds build cifar10 --data_dir=DIR --file_format=array_record
then copy DIR anywhere (or a gs:// bucket) and pass it as `data_dir`.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from lipnorm.data.splits import Splits, make_splits

SUPPORTED = ("cifar10", "cifar100", "fashion_mnist", "mnist", "svhn_cropped")


def _default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")


def _prepare_hint(name: str, data_dir: Optional[str]) -> str:
  target = data_dir or _default_data_dir()
  return (f"Prepare it once on a machine with network and TensorFlow:\n"
          f"  pip install tensorflow tensorflow-datasets\n"
          f"  tfds build {name} --data_dir={target} --file_format=array_record\n"
          f"and pass that folder as data_dir (a TFDS dataset prepared in the default "
          f"TFRecord format cannot be read without TensorFlow). "
          f"Or use a local-archive source (cifar10, cifar100, mnist, fashion_mnist) or the "
          f"embedded 'digits'.")


def _read_split(source, n: int) -> tuple[np.ndarray, np.ndarray]:
  """All (or the first n) examples of a TFDS random-access source as arrays."""
  first = source[0]
  images = np.empty((n,) + np.shape(first["image"]), np.uint8)
  labels = np.empty((n,), np.int64)
  for i in range(n):  # per-item access: ArrayRecord reads + image decoding
    ex = first if i == 0 else source[i]
    images[i] = ex["image"]
    labels[i] = ex["label"]
  return images, labels


def load(name: str, data_dir: Optional[str], num_train: Optional[int] = None,
         num_test: Optional[int] = None) -> Splits:
  """Loads `tfds:<name>` train/test (optionally only the first num_train/num_test)."""
  if name not in SUPPORTED:
    raise ValueError(f"TFDS dataset {name!r} is not supported; supported: "
                     f"{', '.join('tfds:' + s for s in SUPPORTED)}")
  import tensorflow_datasets as tfds  # lazy: only this source needs it
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    sources = {split: tfds.data_source(name, split=split, data_dir=data_dir,
                                       download=False)
               for split in ("train", "test")}
  except Exception as e:  # not prepared, TFRecord-only, unreadable bucket, ...
    looked = data_dir or _default_data_dir()
    raise ValueError(
        f"TFDS dataset {name!r} is not available offline in ArrayRecord format: looked in "
        f"data_dir={looked} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        f"\n{_prepare_hint(name, data_dir)}") from e
  features = builder.info.features
  num_classes = int(features["label"].num_classes)
  image_shape = tuple(features["image"].shape)
  arrays = {}
  for split, limit in (("train", num_train), ("test", num_test)):
    size = len(sources[split])
    if limit is not None and limit > size:
      raise ValueError(f"num_{split}={limit} exceeds the {size} examples of "
                       f"tfds:{name} {split}")
    arrays[split] = _read_split(sources[split], size if limit is None else limit)
  return make_splits(f"tfds:{name}", arrays["train"], arrays["test"], num_classes,
                     image_shape=image_shape,
                     class_names=tuple(features["label"].names)
                     if getattr(features["label"], "names", None) else None)
