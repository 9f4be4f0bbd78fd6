"""CIFAR training augmentation, vectorized over the batch in NumPy.

Random crop with zero padding (the image is padded by `pad` black pixels on each side
and an `H x W` window is cut at offsets `(dy, dx)` in `[0, 2 * pad]`), then an optional
horizontal flip: torchvision's `RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`
on the raw image, before standardization. Vectorized over the batch: one row gather
from a padded copy, one flip of the selected examples.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


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
  n, h, w, c = images.shape
  # Zero-padded batch with each row flattened: [n, H + 2p, (W + 2p) * C].
  padded = np.zeros((n, h + 2 * pad, (w + 2 * pad) * c), images.dtype)
  padded[:, pad:pad + h, pad * c:(pad + w) * c] = images.reshape(n, h, w * c)
  # All W*C-long windows of every padded row (a strided view, no copy); the crop takes
  # rows dy..dy+H-1 and the window starting at pixel dx: whole rows copied at once,
  # about 6x faster than gathering single pixels.
  windows = sliding_window_view(padded, w * c, axis=2)
  out = windows[np.arange(n)[:, None], dy[:, None] + np.arange(h), (dx * c)[:, None]]
  out = out.reshape(n, h, w, c)
  # Flip: reverse the pixel order (one C-channel pixel = one void item) of flipped rows.
  pixels = out.view(np.dtype((np.void, c * out.itemsize))).reshape(n, h, w)
  pixels[flip] = pixels[flip][:, :, ::-1]
  return out
