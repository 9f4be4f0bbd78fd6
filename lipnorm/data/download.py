"""Downloads the official dataset files on request (never by default).

  python -m lipnorm.data download cifar10 [--data_dir DIR] [--mirror URL]

or `data.download=True` in a training config (then only when the files are missing).

Each file is fetched from its canonical URL (then the listed mirrors) into
`<folder>/<name>.part`, resuming a partial `.part` with an HTTP Range request, shown
with a tqdm progress bar, checked against the published MD5 and only then renamed to
its final name (`os.replace`, atomic), so the loaders never see a partial or unchecked
file. The folder is `locations.download_dir(name, data_dir)`, one the loaders search.

A `--mirror URL` (or `$LIPNORM_DATA_MIRROR`) replaces the canonical URLs by
`<URL>/<file name>`, e.g. a local copy on an offline cluster; the MD5 is still checked.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import socket
import urllib.error
import urllib.request
from typing import Optional

from lipnorm.data import locations
from lipnorm.registry import Registry

MIRROR_ENV_VAR = "LIPNORM_DATA_MIRROR"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0


class DownloadError(ValueError):
  """A download that failed (network, HTTP status, checksum); the message is one line."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """One official file: its name on disk, where to get it (in order), its published MD5."""
  name: str
  urls: tuple[str, ...]
  md5: str


@dataclasses.dataclass(frozen=True)
class Downloadable:
  name: str                      # the dataset source name ("cifar10", ...)
  files: tuple[RemoteFile, ...]
  note: str = ""


DOWNLOADS: Registry[Downloadable] = Registry("downloadable dataset")


def _register(d: Downloadable) -> None:
  DOWNLOADS.register(d.name)(d)


_TORONTO = "https://www.cs.toronto.edu/~kriz/"
_register(Downloadable("cifar10", (RemoteFile(
    "cifar-10-binary.tar.gz", (_TORONTO + "cifar-10-binary.tar.gz",),
    "c32a1d4ab5d03f1284b67883e8d87530"),), "CIFAR-10 binary version, 170 MB"))
_register(Downloadable("cifar100", (RemoteFile(
    "cifar-100-binary.tar.gz", (_TORONTO + "cifar-100-binary.tar.gz",),
    "03b5dce01913d631647c71ecec9e9cb8"),), "CIFAR-100 binary version, 169 MB"))

_IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# yann.lecun.com is the canonical home of MNIST but often refuses downloads; the S3 copy
# is the one torchvision uses. Both serve byte-identical files (same MD5).
_MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
               "http://yann.lecun.com/exdb/mnist/")
_MNIST_MD5 = ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
              "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")
_FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_FASHION_MD5 = ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")
_register(Downloadable("mnist", tuple(
    RemoteFile(n, tuple(u + n for u in _MNIST_URLS), m)
    for n, m in zip(_IDX_NAMES, _MNIST_MD5)), "MNIST IDX files, 11 MB"))
_register(Downloadable("fashion_mnist", tuple(
    RemoteFile(n, tuple(u + n for u in _FASHION_URLS), m)
    for n, m in zip(_IDX_NAMES, _FASHION_MD5)), "Fashion-MNIST IDX files, 30 MB"))


def downloadable_names() -> list[str]:
  return DOWNLOADS.names()


def md5_of(path: pathlib.Path) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(CHUNK_BYTES), b""):
      h.update(block)
  return h.hexdigest()


def download(name: str, data_dir: Optional[str] = None, *, mirror: Optional[str] = None,
             progress: bool = True) -> pathlib.Path:
  """Fetches every file of dataset `name` that is not already there; returns the folder.

  Raises ValueError for an unknown name (listing the valid ones) or an unusable folder,
  and DownloadError (a ValueError, one line) when a file cannot be fetched or fails its
  MD5 check.
  """
  entry = DOWNLOADS.get(name)
  folder = locations.download_dir(name, data_dir)
  if folder.exists() and not folder.is_dir():
    raise ValueError(f"data_dir: {folder} exists and is not a folder; choose another data_dir")
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"data_dir: cannot create {folder} ({e.strerror or e}); choose a "
                     f"writable data_dir") from None
  mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV_VAR) or None
  for remote in entry.files:
    if mirror:
      remote = dataclasses.replace(remote, urls=(f"{mirror.rstrip('/')}/{remote.name}",))
    fetch(remote, folder, progress=progress)
  return folder


def fetch(remote: RemoteFile, folder: pathlib.Path, *, progress: bool = True,
          timeout: float = TIMEOUT_S) -> pathlib.Path:
  """`folder/remote.name`, downloaded (resuming `<name>.part`) and MD5-checked if absent.

  An existing final file is checked, never replaced: a wrong MD5 there is an error.
  """
  dest = pathlib.Path(folder) / remote.name
  if dest.is_file():
    got = md5_of(dest)
    if got != remote.md5:
      raise DownloadError(f"{dest} exists but its MD5 is {got}, expected {remote.md5}; "
                          f"move it away to download it again")
    return dest
  part = dest.with_name(dest.name + ".part")
  failures = []
  for url in remote.urls:
    try:
      _get(url, part, remote.name, progress, timeout)
      break
    except DownloadError as e:
      failures.append(str(e))
  else:
    have = part.stat().st_size if part.exists() else 0
    raise DownloadError(
        f"cannot download {remote.name}: {'; '.join(failures)}"
        f"{f' ({have} bytes kept in {part}; rerun to resume)' if have else ''}")
  got = md5_of(part)
  if got != remote.md5:
    part.unlink()
    raise DownloadError(f"{remote.name}: MD5 mismatch (expected {remote.md5}, got {got}); "
                        f"the download was removed, rerun to fetch it again")
  os.replace(part, dest)
  return dest


def _get(url: str, part: pathlib.Path, label: str, progress: bool, timeout: float) -> None:
  """Appends the rest of `url` to `part` (HTTP Range from its size); DownloadError (one
  line) on any network or HTTP failure, keeping what arrived for the next try."""
  from tqdm import tqdm
  start = part.stat().st_size if part.exists() else 0
  headers = {"User-Agent": "lipnorm"}
  if start:
    headers["Range"] = f"bytes={start}-"
  try:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=timeout) as resp:
      if start and resp.status != 206:   # the server ignored the Range: start over
        start = 0
      length = resp.headers.get("Content-Length")
      total = start + int(length) if length is not None else None
      with open(part, "ab" if start else "wb") as f, tqdm(
          total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
          desc=label, disable=not progress, leave=False) as bar:
        while True:
          try:
            block = resp.read(CHUNK_BYTES)
          except http.client.IncompleteRead as e:
            f.write(e.partial)   # keep what arrived: the next try resumes after it
            raise
          if not block:
            break
          f.write(block)
          bar.update(len(block))
        f.flush()
        os.fsync(f.fileno())
      if total is not None and part.stat().st_size < total:
        raise DownloadError(f"{url}: connection closed after {part.stat().st_size} of "
                            f"{total} bytes")
  except urllib.error.HTTPError as e:
    if e.code == 416 and start:   # nothing after `start`: the .part is already whole
      return
    raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
  except urllib.error.URLError as e:
    raise DownloadError(f"{url}: {e.reason}") from None
  except http.client.IncompleteRead as e:
    raise DownloadError(f"{url}: connection dropped after {part.stat().st_size} bytes "
                        f"({len(e.partial)} in the last read)") from None
  except (http.client.HTTPException, socket.timeout, ConnectionError, OSError) as e:
    raise DownloadError(f"{url}: {type(e).__name__}: {e}") from None


def ensure_files(name: str, data_dir: Optional[str]) -> None:
  """For `data.download=True`: downloads `name` if it is a downloadable dataset."""
  if name in DOWNLOADS:
    download(name, data_dir)
