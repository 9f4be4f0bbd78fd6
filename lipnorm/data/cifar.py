"""CIFAR-10 / CIFAR-100 "binary version" readers (the official archives, no extraction).

Record layout (https://www.cs.toronto.edu/~kriz/cifar.html):
  CIFAR-10:  1 label byte, then 3072 pixel bytes (1024 red, 1024 green, 1024 blue,
             each a row-major 32x32 plane) = 3073 bytes; `data_batch_{1..5}.bin` and
             `test_batch.bin`, 10000 records each, in `cifar-10-batches-bin/`.
  CIFAR-100: 1 coarse label byte, 1 fine label byte, 3072 pixel bytes = 3074 bytes;
             `train.bin` (50000) and `test.bin` (10000) in `cifar-100-binary/`.
             lipnorm uses the 100 fine labels.
Accepted locations in a folder: the `.tar.gz` (read with `tarfile`, in memory), the
extracted folder, or the `.bin` files directly in the folder.
"""
from __future__ import annotations

import dataclasses
import pathlib
import tarfile
import zlib
from typing import Optional, Sequence

import numpy as np

from lipnorm.data import locations
from lipnorm.data.splits import Splits, make_splits

_PIXELS = 32 * 32 * 3


@dataclasses.dataclass(frozen=True)
class CifarFormat:
  name: str
  archive: str                  # official archive file name
  folder: str                   # folder inside the archive / after extraction
  train_files: tuple[str, ...]
  test_files: tuple[str, ...]
  label_bytes: int              # bytes before the pixels in each record
  label_offset: int             # which of those bytes is the label lipnorm uses
  num_classes: int
  records_per_file: dict        # official record count of each file (for messages)
  names_file: str               # class names, one per line
  url: str

  @property
  def record_bytes(self) -> int:
    return self.label_bytes + _PIXELS


CIFAR10 = CifarFormat(
    name="cifar10", archive="cifar-10-binary.tar.gz", folder="cifar-10-batches-bin",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_files=("test_batch.bin",), label_bytes=1, label_offset=0, num_classes=10,
    records_per_file={**{f"data_batch_{i}.bin": 10000 for i in range(1, 6)},
                      "test_batch.bin": 10000},
    names_file="batches.meta.txt",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz")

CIFAR100 = CifarFormat(
    name="cifar100", archive="cifar-100-binary.tar.gz", folder="cifar-100-binary",
    train_files=("train.bin",), test_files=("test.bin",), label_bytes=2,
    label_offset=1, num_classes=100, records_per_file={"train.bin": 50000,
                                                       "test.bin": 10000},
    names_file="fine_label_names.txt",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz")


def find(fmt: CifarFormat, data_dir: Optional[str]) -> pathlib.Path:
  """The archive file or the folder holding the `.bin` files; ValueError when absent."""
  looked = locations.candidate_dirs(fmt.name, data_dir)
  for d in looked:
    if d.is_file() and d.name.endswith(".tar.gz"):
      return d
    if (d / fmt.archive).is_file():
      return d / fmt.archive
    for cand in (d / fmt.folder, d):
      if cand.is_dir() and all((cand / f).is_file()
                               for f in fmt.train_files + fmt.test_files):
        return cand
  raise locations.not_found_error(
      fmt.name, looked,
      f"{fmt.archive} or its extracted folder {fmt.folder}/ "
      f"({', '.join(fmt.train_files + fmt.test_files)})",
      f"Get the official binary version ({fmt.url}) and put it in one of these folders, "
      f"or use source 'tfds:{fmt.name}' with a prepared TFDS data_dir.")


def _expected(fmt: CifarFormat, member: str) -> str:
  n = fmt.records_per_file[member]
  return (f"{fmt.record_bytes}-byte records (the official file holds {n} records = "
          f"{n * fmt.record_bytes} bytes)")


def _check_size(fmt: CifarFormat, raw: bytes, origin: str, member: str) -> int:
  """Number of records in one `.bin` file; ValueError when not a whole number."""
  rb = fmt.record_bytes
  if len(raw) == 0 or len(raw) % rb:
    raise ValueError(
        f"{origin}: {member} has {len(raw)} bytes, not a whole number of "
        f"{_expected(fmt, member)}; the file is truncated or corrupt: download it again")
  return len(raw) // rb


def decode_records(fmt: CifarFormat, raws: Sequence[bytes], origin: str,
                   members: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """bytes of `.bin` files -> (uint8 images [n, 32, 32, 3], int32 labels [n]), in order."""
  counts = [_check_size(fmt, raw, origin, m) for raw, m in zip(raws, members)]
  images = np.empty((sum(counts), 32, 32, 3), np.uint8)
  labels = np.empty((sum(counts),), np.int32)
  start = 0
  for raw, n in zip(raws, counts):
    rec = np.frombuffer(raw, np.uint8).reshape(n, fmt.record_bytes)
    labels[start:start + n] = rec[:, fmt.label_offset]
    # R, G, B planes -> HWC, one channel at a time straight into the output (3x faster
    # than a 4-d transpose; no concatenate copy).
    out = images[start:start + n].reshape(n, 1024, 3)
    for c in range(3):
      out[:, :, c] = rec[:, fmt.label_bytes + 1024 * c:fmt.label_bytes + 1024 * (c + 1)]
    start += n
  return images, labels


def _read_members(fmt: CifarFormat, path: pathlib.Path) -> tuple[dict, Optional[bytes]]:
  """{member basename: bytes} for the needed files (+ the class-names file if any)."""
  wanted = set(fmt.train_files + fmt.test_files)
  if path.is_dir():
    return ({f: (path / f).read_bytes() for f in wanted},
            (path / fmt.names_file).read_bytes()
            if (path / fmt.names_file).is_file() else None)
  found, names = {}, None
  try:
    with tarfile.open(path, "r:gz") as tar:
      for member in tar:  # one sequential pass over the gzip stream
        base = member.name.rsplit("/", 1)[-1]
        if member.isfile() and (base in wanted or base == fmt.names_file):
          data = tar.extractfile(member).read()
          if len(data) != member.size:
            raise EOFError(f"member {member.name} ended after {len(data)} of "
                           f"{member.size} bytes")
          if base == fmt.names_file:
            names = data
          else:
            found[base] = data
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    sizes = ", ".join(f"{f}: {fmt.records_per_file[f] * fmt.record_bytes} bytes"
                      for f in sorted(wanted))
    raise ValueError(
        f"{path}: cannot read the archive ({type(e).__name__}: {e}); it is truncated or "
        f"corrupt ({path.stat().st_size} bytes on disk). Expected a gzip tar holding "
        f"{fmt.folder}/ with {sizes}. Download it again from {fmt.url}") from e
  missing = sorted(wanted - set(found))
  if missing:
    raise ValueError(f"{path}: archive lacks {', '.join(missing)} (expected "
                     f"{fmt.folder}/{{{', '.join(sorted(wanted))}}})")
  return found, names


def load(fmt: CifarFormat, path: pathlib.Path) -> Splits:
  """Decodes the archive or folder found by `find` into checked `Splits`."""
  members, names = _read_members(fmt, path)
  train = decode_records(fmt, [members[f] for f in fmt.train_files], str(path),
                         fmt.train_files)
  test = decode_records(fmt, [members[f] for f in fmt.test_files], str(path),
                        fmt.test_files)
  class_names = None
  if names is not None:
    lines = [l.strip() for l in names.decode("utf-8", "replace").splitlines()]
    lines = [l for l in lines if l]
    class_names = tuple(lines) if len(lines) == fmt.num_classes else None
  return make_splits(fmt.name, train, test, fmt.num_classes, image_shape=(32, 32, 3),
                     class_names=class_names)
