"""MNIST / Fashion-MNIST IDX readers (`.gz` or raw files, official names).

IDX layout (http://yann.lecun.com/exdb/mnist/): a 4-byte big-endian magic
`0x00 0x00 <type> <ndim>` (type 0x08 = unsigned byte), then `ndim` big-endian uint32
dimensions, then the row-major data. Images: `[N, 28, 28]` (magic 0x00000803); labels:
`[N]` (magic 0x00000801).
"""
from __future__ import annotations

import dataclasses
import gzip
import pathlib
import zlib
from typing import Optional

import numpy as np

from lipnorm.data import locations
from lipnorm.data.splits import Splits, make_splits

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True)
class IdxDataset:
  name: str
  url: str
  num_classes: int = 10


MNIST = IdxDataset("mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of "
                   "http://yann.lecun.com/exdb/mnist/)")
FASHION_MNIST = IdxDataset(
    "fashion_mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (see "
    "https://github.com/zalandoresearch/fashion-mnist)")


def parse_idx(raw: bytes, origin: str) -> np.ndarray:
  """Bytes of one IDX file (unsigned-byte type) -> uint8 array of its dimensions."""
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{origin}: not an IDX file (bad magic {raw[:4].hex()!r}); "
                     f"expected 0x000008NN")
  dtype_code, ndim = raw[2], raw[3]
  if dtype_code != 0x08:
    raise ValueError(f"{origin}: IDX data type 0x{dtype_code:02x}; only unsigned bytes "
                     f"(0x08) are used by MNIST-style datasets")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{origin}: truncated IDX header ({len(raw)} bytes, expected at "
                     f"least {header})")
  dims = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
  expected = header + int(np.prod(dims, dtype=np.int64))
  if len(raw) != expected:
    raise ValueError(
        f"{origin}: {len(raw)} bytes, but its header declares shape {dims}, i.e. "
        f"{expected} bytes; the file is truncated or corrupt: download it again")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _file(d: pathlib.Path, base: str) -> Optional[pathlib.Path]:
  for cand in (d / (base + ".gz"), d / base):
    if cand.is_file():
      return cand
  return None


def find(ds: IdxDataset, data_dir: Optional[str]) -> pathlib.Path:
  """The folder holding the four IDX files (each `.gz` or raw); ValueError when absent."""
  looked = locations.candidate_dirs(ds.name, data_dir)
  for d in looked:
    if d.is_dir() and all(_file(d, b) for b in FILES.values()):
      return d
  raise locations.not_found_error(
      ds.name, looked,
      "the four IDX files " + ", ".join(f"{b}(.gz)" for b in FILES.values()),
      f"Get the official files from {ds.url} and put them in one of these folders, or "
      f"use source 'tfds:{ds.name}' with a prepared TFDS data_dir.")


def read_idx(path: pathlib.Path) -> np.ndarray:
  try:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
  except (EOFError, OSError, zlib.error) as e:
    raise ValueError(f"{path}: cannot decompress ({type(e).__name__}: {e}); the file is "
                     f"truncated or corrupt ({path.stat().st_size} bytes on disk): "
                     f"download it again") from e
  return parse_idx(raw, str(path))


def load(ds: IdxDataset, folder: pathlib.Path) -> Splits:
  arrays = {k: read_idx(_file(folder, b)) for k, b in FILES.items()}
  for split in ("train", "test"):
    images = arrays[f"{split}_images"]
    if images.ndim != 3:
      raise ValueError(f"{_file(folder, FILES[split + '_images'])}: image array has "
                       f"shape {images.shape}; expected [N, H, W]")
    arrays[f"{split}_images"] = images[..., None]  # [N, H, W, 1]
  return make_splits(
      ds.name, (arrays["train_images"], arrays["train_labels"]),
      (arrays["test_images"], arrays["test_labels"]), ds.num_classes,
      image_shape=(28, 28, 1))
