"""`Splits`: a dataset decoded into memory, and the load-time checks every source runs.

Images stay in their stored integer form (uint8, values in `[0, pixel_max]`) so that
CIFAR-10's 50000 training images take 150 MB rather than 600 MB as float32; the
pipeline converts and standardizes one batch at a time.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Splits:
  """Train and test arrays of one dataset.

  Attributes:
    name: source name (e.g. "cifar10", "tfds:mnist", "digits").
    train_images, test_images: uint8 `[N, H, W, C]`, values in `[0, pixel_max]`.
    train_labels, test_labels: int32 `[N]`, values in `[0, num_classes)`.
    num_classes: number of classes.
    pixel_max: the value that maps to 1.0 (255 for 8-bit images, 16 for sklearn digits).
    class_names: optional names of the classes.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  pixel_max: int = 255
  class_names: Optional[tuple[str, ...]] = None

  def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of "train" or "test"."""
    if split == "train":
      return self.train_images, self.train_labels
    if split == "test":
      return self.test_images, self.test_labels
    raise ValueError(f"unknown split {split!r}; valid splits: train, test")


def check_split(name: str, split: str, images: np.ndarray, labels: np.ndarray,
                num_classes: int, image_shape: Optional[tuple[int, ...]] = None,
                pixel_max: int = 255) -> tuple[np.ndarray, np.ndarray]:
  """Validates one split and returns read-only (uint8 images, int32 labels).

  Catches at load time what would otherwise surface as silent garbage during
  training: image/label count mismatch, wrong image rank or shape, labels outside
  `[0, num_classes)`, pixel values above `pixel_max`.
  """
  where = f"{name} {split} split"
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 4:
    raise ValueError(
        f"{where}: images have shape {images.shape}; expected [N, H, W, C] (4 dims)")
  if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
    raise ValueError(
        f"{where}: image shape {tuple(images.shape[1:])} does not match the expected "
        f"{tuple(image_shape)}")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(
        f"{where}: labels have shape {labels.shape} but there are {images.shape[0]} "
        f"images; expected labels of shape ({images.shape[0]},)")
  if images.shape[0] == 0:
    raise ValueError(f"{where} is empty")
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.integer):
      raise ValueError(f"{where}: images have dtype {images.dtype}; expected integers")
    if images.min() < 0 or images.max() > 255:
      raise ValueError(f"{where}: pixel values outside [0, 255]")
    images = images.astype(np.uint8)
  if int(images.max()) > pixel_max:
    raise ValueError(
        f"{where}: pixel value {int(images.max())} exceeds the dataset's maximum "
        f"{pixel_max}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels have dtype {labels.dtype}; expected integers")
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0 or hi >= num_classes:
    bad = lo if lo < 0 else hi
    raise ValueError(
        f"{where}: label {bad} is out of range; labels must lie in [0, {num_classes})")
  images = np.ascontiguousarray(images)
  labels = np.ascontiguousarray(labels, dtype=np.int32)
  images.setflags(write=False)  # shared through the in-memory cache: never mutate
  labels.setflags(write=False)
  return images, labels


def make_splits(name: str, train: tuple[np.ndarray, np.ndarray],
                test: tuple[np.ndarray, np.ndarray], num_classes: int, *,
                image_shape: Optional[tuple[int, ...]] = None, pixel_max: int = 255,
                class_names: Optional[tuple[str, ...]] = None) -> Splits:
  """Checks both splits (same image shape) and builds a `Splits`."""
  tr_x, tr_y = check_split(name, "train", *train, num_classes, image_shape, pixel_max)
  te_x, te_y = check_split(name, "test", *test, num_classes, tr_x.shape[1:], pixel_max)
  return Splits(name, tr_x, tr_y, te_x, te_y, num_classes, pixel_max,
                tuple(class_names) if class_names else None)
