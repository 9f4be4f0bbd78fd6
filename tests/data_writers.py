"""Writers of the official dataset formats, for tests: small archives built from known
arrays, written independently of lipnorm's readers (plain byte layout from the specs)."""
from __future__ import annotations

import gzip
import io
import pathlib
import struct
import tarfile

import numpy as np


def cifar_records(images: np.ndarray, labels: np.ndarray,
                  coarse: np.ndarray | None = None) -> bytes:
  """CIFAR binary records: [coarse byte,] label byte, R plane, G plane, B plane."""
  out = bytearray()
  for i in range(len(labels)):
    if coarse is not None:
      out.append(int(coarse[i]))
    out.append(int(labels[i]))
    for c in range(3):
      out += images[i, :, :, c].tobytes()  # row-major 32x32 plane
  return bytes(out)


def random_images(rng: np.random.Generator, n: int, shape=(32, 32, 3)) -> np.ndarray:
  return rng.integers(0, 256, (n,) + shape, dtype=np.uint8)


def write_cifar10(root: pathlib.Path, train_parts, test, archive: bool = True) -> pathlib.Path:
  """train_parts: 5 (images, labels) pairs -> data_batch_{1..5}.bin; test -> test_batch.bin.

  archive=True writes `cifar-10-binary.tar.gz` under root, else the extracted folder.
  """
  files = {f"data_batch_{i + 1}.bin": cifar_records(*p) for i, p in enumerate(train_parts)}
  files["test_batch.bin"] = cifar_records(*test)
  files["batches.meta.txt"] = "\n".join(f"class{c}" for c in range(10)).encode() + b"\n\n"
  return _write(root, "cifar-10-batches-bin", "cifar-10-binary.tar.gz", files, archive)


def write_cifar100(root: pathlib.Path, train, test, archive: bool = True) -> pathlib.Path:
  """train / test: (images, fine labels, coarse labels)."""
  files = {"train.bin": cifar_records(train[0], train[1], train[2]),
           "test.bin": cifar_records(test[0], test[1], test[2])}
  return _write(root, "cifar-100-binary", "cifar-100-binary.tar.gz", files, archive)


def _write(root, folder, archive_name, files, archive):
  root.mkdir(parents=True, exist_ok=True)
  if not archive:
    (root / folder).mkdir(exist_ok=True)
    for name, data in files.items():
      (root / folder / name).write_bytes(data)
    return root / folder
  path = root / archive_name
  with tarfile.open(path, "w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(f"{folder}/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def idx_bytes(array: np.ndarray) -> bytes:
  """IDX: magic 0x00 0x00 0x08 ndim, big-endian uint32 dims, uint8 data."""
  header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx_dataset(folder: pathlib.Path, train, test, gz: bool = True) -> pathlib.Path:
  """train/test: (images [N, H, W] uint8, labels [N]) -> the four official file names."""
  folder.mkdir(parents=True, exist_ok=True)
  for prefix, (images, labels) in (("train", train), ("t10k", test)):
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
      data = idx_bytes(np.asarray(arr, np.uint8))
      name = f"{prefix}-{kind}-ubyte"
      if gz:
        (folder / (name + ".gz")).write_bytes(gzip.compress(data))
      else:
        (folder / name).write_bytes(data)
  return folder
