"""The dataset-source registry and its in-memory cache of decoded arrays.

Source names:
  digits                       scikit-learn's bundled 8x8 digits (offline default)
  cifar10, cifar100            official CIFAR binary archives (.tar.gz or extracted)
  mnist, fashion_mnist         official IDX files (.gz or raw)
  tfds:<name>                  TFDS ArrayRecord datasets: cifar10, cifar100, mnist,
                               fashion_mnist, svhn_cropped
Decoded arrays are cached in memory (never on disk), keyed by the resolved files and
their sizes and modification times, so building several datasets from the same
archive in one process decodes it once. `clear_cache()` empties it.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Callable, Hashable, Optional

from lipnorm.data import cifar, digits, idx, tfds_source
from lipnorm.data.splits import Splits
from lipnorm.registry import Registry


@dataclasses.dataclass(frozen=True)
class LoadRequest:
  data_dir: Optional[str] = None
  num_train: Optional[int] = None   # a source may read only this many (TFDS does)
  num_test: Optional[int] = None
  digits_test_fraction: float = 0.2
  download: bool = False            # fetch missing official files (lipnorm.data.download)


@dataclasses.dataclass(frozen=True)
class Source:
  """A named dataset source.

  resolve: request -> hashable key naming exactly what will be read (raises the
    not-found ValueError, cheaply, before any decoding).
  read: key -> `Splits`.
  """
  name: str
  description: str
  resolve: Callable[[LoadRequest], Hashable]
  read: Callable[[Hashable], Splits]
  augment_by_default: bool = False


SOURCES: Registry[Source] = Registry("dataset source")


def _register(source: Source) -> None:
  SOURCES.register(source.name)(source)


def _stamp(path: pathlib.Path) -> tuple:
  """Identifies a file's or folder's current contents for the cache key."""
  if path.is_file():
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)
  return (str(path.resolve()),) + tuple(
      (p.name, p.stat().st_size, p.stat().st_mtime_ns)
      for p in sorted(path.iterdir()) if p.is_file())


_register(Source(
    "digits", "scikit-learn's bundled 8x8 handwritten digits (1797 images; no download)",
    resolve=lambda req: (float(req.digits_test_fraction),),
    read=lambda key: digits.load(key[0])))

for _fmt in (cifar.CIFAR10, cifar.CIFAR100):
  _register(Source(
      _fmt.name, f"official {_fmt.archive} (or its extracted {_fmt.folder}/)",
      resolve=lambda req, f=_fmt: _stamp(cifar.find(f, req.data_dir)),
      read=lambda key, f=_fmt: cifar.load(f, pathlib.Path(key[0])),
      augment_by_default=True))

for _ds in (idx.MNIST, idx.FASHION_MNIST):
  _register(Source(
      _ds.name, "official IDX files (train/t10k images/labels, .gz or raw)",
      resolve=lambda req, d=_ds: _stamp(idx.find(d, req.data_dir)),
      read=lambda key, d=_ds: idx.load(d, pathlib.Path(key[0]))))

for _name in tfds_source.SUPPORTED:
  _register(Source(
      f"tfds:{_name}", f"TFDS {_name} prepared in ArrayRecord format (no TensorFlow)",
      resolve=lambda req, n=_name: (n, req.data_dir, req.num_train, req.num_test),
      read=lambda key: tfds_source.load(*key),
      augment_by_default=_name in ("cifar10", "cifar100")))


def dataset_names() -> list[str]:
  """All valid `source` names."""
  return SOURCES.names()


def get_source(name: str) -> Source:
  return SOURCES.get(name)


@functools.lru_cache(maxsize=4)
def _read_cached(name: str, key: Hashable) -> Splits:
  return SOURCES.get(name).read(key)


def load_splits(name: str, request: LoadRequest = LoadRequest()) -> Splits:
  """Decoded, checked train/test arrays of source `name` (cached in memory). With
  `request.download`, missing files of a downloadable source are fetched first."""
  source = SOURCES.get(name)
  try:
    key = source.resolve(request)
  except ValueError:
    from lipnorm.data import download
    if not (request.download and name in download.DOWNLOADS):
      raise
    download.download(name, request.data_dir)
    key = source.resolve(request)
  return _read_cached(name, key)


def clear_cache() -> None:
  _read_cached.cache_clear()
