"""CIFAR training augmentation, vectorized over the batch in NumPy.

Random crop with zero padding (the image is padded by `pad` black pixels on each side
and an `H x W` window is cut at offsets `(dy, dx)` in `[0, 2 * pad]`), then an optional
horizontal flip: torchvision's `RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`
on the raw image, before standardization. One gather per batch; the padded batch is
never materialized.
"""
from __future__ import annotations

import numpy as np


def draw_crop_flip(rng: np.random.Generator, n: int, pad: int = 4
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-example parameters: dy, dx int `[n]` in `[0, 2 * pad]`, flip bool `[n]`."""
  dy = rng.integers(0, 2 * pad + 1, size=n)
  dx = rng.integers(0, 2 * pad + 1, size=n)
  flip = rng.random(n) < 0.5
  return dy, dx, flip


def crop_and_flip(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray,
                  pad: int = 4) -> np.ndarray:
  """images `[n, H, W, C]` -> same shape and dtype.

  out[i, r, c] = padded_i[dy_i + r, dx_i + c'] with c' = W-1-c when flip_i else c,
  where padded_i is image i with `pad` zeros around it.
  """
  n, h, w, _ = images.shape
  rows = dy[:, None] - pad + np.arange(h)                       # [n, H] source rows
  cols = dx[:, None] - pad + np.arange(w)                       # [n, W] source cols
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  out = images[np.arange(n)[:, None, None], np.clip(rows, 0, h - 1)[:, :, None],
               np.clip(cols, 0, w - 1)[:, None, :]]
  outside = ~(((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
  out[outside] = 0                                              # the zero padding
  return out
