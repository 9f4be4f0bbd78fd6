"""The input pipeline: `get_dataset(config, ...)` -> `Dataset` (train iterator, eval, probe).

Determinism: the training batch at (epoch, step) is a pure function of (seed, epoch,
step): epoch `e` visits the training set in the order `rng([seed, 0, e]).permutation`,
step `s` takes the global batch `perm[s * B:(s + 1) * B]` (the remainder is dropped),
and augmentation parameters for that global batch come from `rng([seed, 1, e, s])`.
Process `p` of `P` takes rows `[p * B/P, (p + 1) * B/P)` of every global batch, so
the processes' batches are disjoint and together equal the single-process batch,
augmentation included. A resumable state is just (epoch, step) of the next batch.
"""
from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import numpy as np

from lipnorm.data import augment as aug
from lipnorm.data.sources import LoadRequest, get_source, load_splits
from lipnorm.data.splits import Splits

_PERM_STREAM, _AUG_STREAM = 0, 1     # independent random streams derived from the seed
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a trainer need to know about the data.

  name: source name; image_shape: (H, W, C); num_classes; num_train / num_test: the
  examples used (after the optional num_train / num_test subsets); mean, std:
  per-channel constants applied as `(x / pixel_max - mean) / std` (computed on the
  training examples used; zeros and ones when standardization is off).
  """
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int
  num_test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: Optional[tuple[str, ...]] = None
  pixel_max: int = 255


def _field(cfg: Any, name: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping):
    value = cfg.get(name, default)
  else:
    value = getattr(cfg, name, default)
  return default if value is None else value


def _positive_int(name: str, value: Any, allow_none: bool = False) -> Optional[int]:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"data.{name}={value!r} must be a positive integer"
                     + (" or None" if allow_none else ""))
  return int(value)


def check_geometry(batch_size: Any, eval_batch_size: Any, num_local_devices: Any,
                   process_index: Any, process_count: Any) -> None:
  """ValueError unless the global batches split evenly over processes and devices."""
  process_count = _positive_int("process_count", process_count)
  if (isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer))
      or not 0 <= process_index < process_count):
    raise ValueError(f"process_index={process_index!r} must be an int in "
                     f"[0, {process_count})")
  num_local_devices = _positive_int("num_local_devices", num_local_devices)
  shards = process_count * num_local_devices
  for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    value = _positive_int(name, value)
    if value % shards:
      raise ValueError(
          f"data.{name}={value} is not divisible by process_count * num_local_devices = "
          f"{process_count} * {num_local_devices} = {shards}; use a multiple of {shards}")


def channel_stats(images: np.ndarray, pixel_max: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact per-channel mean and (population) std of `images / pixel_max`.

  images: integer `[N, H, W, C]` with values in [0, 255]. Uses per-channel histograms
  of the 256 pixel values (chunked), so no float copy of the dataset is made.
  """
  c = images.shape[-1]
  flat = images.reshape(-1, c)
  hist = np.zeros((256, c), np.int64)
  chunk = 1 << 16  # cache-sized chunks keep bincount's int conversion cheap
  for start in range(0, flat.shape[0], chunk):
    part = flat[start:start + chunk]
    for ch in range(c):
      hist[:, ch] += np.bincount(part[:, ch], minlength=256)
  values = np.arange(256, dtype=np.float64)[:, None] / pixel_max
  count = hist.sum(0)
  mean = (hist * values).sum(0) / count
  var = (hist * (values - mean) ** 2).sum(0) / count
  return mean, np.sqrt(var)


class Dataset:
  """A loaded dataset with its batch geometry. Build it with `get_dataset`.

  Attributes:
    info: `DatasetInfo`.
    batch_size / eval_batch_size: global sizes (all processes and devices).
    local_batch_size: `batch_size // process_count` (this process's rows).
    per_device_batch_size: `local_batch_size // num_local_devices`.
    steps_per_epoch: `num_train // batch_size` (drop remainder).
  """

  def __init__(self, splits: Splits, *, seed: int, batch_size: int, eval_batch_size: int,
               num_local_devices: int, process_index: int, process_count: int,
               augment: bool, standardize: bool, num_train: Optional[int],
               num_test: Optional[int], prefetch: int = 2, crop_padding: int = 4):
    check_geometry(batch_size, eval_batch_size, num_local_devices, process_index,
                   process_count)
    self.seed = int(seed) % (1 << 64)   # SeedSequence needs a non-negative entropy
    self.batch_size = batch_size
    self.eval_batch_size = eval_batch_size
    self.num_local_devices = num_local_devices
    self.process_index = process_index
    self.process_count = process_count
    self.augment = augment
    self.standardize = standardize
    self.prefetch = prefetch
    self.crop_padding = crop_padding
    self._train = self._subset(splits, "train", num_train)
    self._test = self._subset(splits, "test", num_test)
    n_train = len(self._train[1])
    if n_train < batch_size:
      raise ValueError(
          f"data.batch_size={batch_size} exceeds the {n_train} training examples of "
          f"{splits.name!r}: an epoch would have no full batch (training drops the "
          f"remainder); use a batch_size <= {n_train}")
    self.local_batch_size = batch_size // process_count
    self.per_device_batch_size = self.local_batch_size // num_local_devices
    self.steps_per_epoch = n_train // batch_size
    c = splits.train_images.shape[-1]
    if standardize:
      mean, std = channel_stats(self._train[0], splits.pixel_max)
      std = np.maximum(std, 1e-8)
    else:
      mean, std = np.zeros(c), np.ones(c)
    # x_std = x * scale + shift  ==  (x / pixel_max - mean) / std, per channel.
    self._scale = (1.0 / (splits.pixel_max * std)).astype(np.float32)
    self._shift = (-mean / std).astype(np.float32)
    self.info = DatasetInfo(
        name=splits.name, image_shape=tuple(int(s) for s in splits.train_images.shape[1:]),
        num_classes=splits.num_classes, num_train=n_train, num_test=len(self._test[1]),
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        class_names=splits.class_names, pixel_max=splits.pixel_max)

  @staticmethod
  def _subset(splits: Splits, split: str, n: Optional[int]):
    images, labels = splits.split(split)
    if n is None:
      return images, labels
    if n > len(labels):
      raise ValueError(f"data.num_{split}={n} exceeds the {len(labels)} examples of the "
                       f"{splits.name!r} {split} split")
    return images[:n], labels[:n]

  # ---- conversion ---------------------------------------------------------------------

  def standardize_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[..., C]` -> float32 `(x / pixel_max - mean) / std` (or `x / pixel_max`)."""
    images = np.asarray(images)
    if images.ndim < 2 or images.size == 0:
      return images.astype(np.float32) * self._scale + self._shift
    # Broadcasting the per-channel constants over a length-C last axis runs NumPy's
    # inner loop C elements at a time (~20x slower on a CIFAR batch); tile them along
    # each example's H*W*C values instead and convert inside the multiply (the same
    # float32 operations, so the same numbers).
    flat = images.reshape(images.shape[0], -1)
    reps = flat.shape[1] // len(self._scale)
    out = np.multiply(flat, np.tile(self._scale, reps), dtype=np.float32)
    out += np.tile(self._shift, reps)
    return out.reshape(images.shape)

  def _device_shape(self, x: np.ndarray) -> np.ndarray:
    """`[b, ...]` -> `[num_local_devices, b // num_local_devices, ...]`."""
    return x.reshape((self.num_local_devices, -1) + x.shape[1:])

  def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "train":
      return self._train
    if split == "test":
      return self._test
    raise ValueError(f"unknown split {split!r}; valid splits: train, test")

  # ---- training -----------------------------------------------------------------------

  def epoch_permutation(self, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the training examples."""
    rng = np.random.default_rng([self.seed, _PERM_STREAM, int(epoch)])
    return rng.permutation(self.info.num_train)

  def train_batch(self, epoch: int, step: int, perm: Optional[np.ndarray] = None
                  ) -> dict[str, np.ndarray]:
    """This process's part of global training batch (epoch, step).

    Returns {"image": float32 `[D, per_device_batch, H, W, C]`, "label": int32
    `[D, per_device_batch]`}.
    """
    if not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"step={step} must lie in [0, {self.steps_per_epoch})")
    if perm is None:
      perm = self.epoch_permutation(epoch)
    b, p = self.local_batch_size, self.process_index
    rows = slice(p * b, (p + 1) * b)
    idx = perm[step * self.batch_size:(step + 1) * self.batch_size][rows]
    images, labels = self._train[0][idx], self._train[1][idx]
    if self.augment:
      # Drawn for the whole global batch, then sliced: independent of process_count.
      rng = np.random.default_rng([self.seed, _AUG_STREAM, int(epoch), int(step)])
      dy, dx, flip = aug.draw_crop_flip(rng, self.batch_size, self.crop_padding)
      images = aug.crop_and_flip(images, dy[rows], dx[rows], flip[rows], self.crop_padding)
    return {"image": self._device_shape(self.standardize_images(images)),
            "label": self._device_shape(labels.astype(np.int32))}

  def train_iterator(self, state: Optional[dict] = None,
                     prefetch: Optional[int] = None) -> "TrainIterator":
    """An endless iterator over training batches, starting at `state` (or the start).

    `state` is a dict from `TrainIterator.get_state()`; resuming from it yields exactly
    the batches that would have come next. `prefetch` (default: the config's, 2)
    batches are prepared ahead in a background thread; 0 disables the thread.
    """
    epoch, step = self._check_state(state) if state is not None else (0, 0)
    return TrainIterator(self, epoch, step,
                         self.prefetch if prefetch is None else int(prefetch))

  def _check_state(self, state: dict) -> tuple[int, int]:
    if not isinstance(state, Mapping) or "epoch" not in state or "step" not in state:
      raise ValueError(f"iterator state {state!r} must be a dict from get_state() with "
                       f"'epoch' and 'step'")
    for key, mine in (("seed", self.seed), ("batch_size", self.batch_size),
                      ("num_train", self.info.num_train), ("source", self.info.name)):
      if key in state and state[key] != mine:
        raise ValueError(
            f"iterator state has {key}={state[key]!r} but this dataset has {key}={mine!r}; "
            f"the saved position does not apply (resume with the same data config and "
            f"seed)")
    epoch, step = state["epoch"], state["step"]
    if not (isinstance(epoch, (int, np.integer)) and epoch >= 0):
      raise ValueError(f"iterator state epoch={epoch!r} must be a non-negative int")
    if not (isinstance(step, (int, np.integer)) and 0 <= step < self.steps_per_epoch):
      raise ValueError(f"iterator state step={step!r} must be an int in "
                       f"[0, {self.steps_per_epoch})")
    return int(epoch), int(step)

  # ---- evaluation and probes ------------------------------------------------------------

  def _eval_plan(self, split: str) -> tuple[np.ndarray, int, int]:
    """(this process's example indices, local batch size, number of batches)."""
    n = len(self._split(split)[1])
    p, count = self.process_index, self.process_count
    shard = np.arange(p * n // count, (p + 1) * n // count)
    local = self.eval_batch_size // count
    # Same count on every process (pmap steps must match): sized by the largest shard.
    num_batches = math.ceil(math.ceil(n / count) / local)
    return shard, local, num_batches

  def num_eval_batches(self, split: str = "test") -> int:
    return self._eval_plan(split)[2]

  def eval_batches(self, split: str = "test") -> Iterator[dict[str, np.ndarray]]:
    """Every example of this process's shard of `split` exactly once, no augmentation.

    Yields {"image": float32 `[D, B, H, W, C]`, "label": int32 `[D, B]`, "mask":
    float32 `[D, B]`} with B = eval_batch_size / (process_count * D); padding rows are
    zeros with mask 0. Shards: process p gets examples `[p*N//P, (p+1)*N//P)`; every
    process yields the same number of batches.
    """
    images, labels = self._split(split)
    shard, local, num_batches = self._eval_plan(split)
    for k in range(num_batches):
      idx = shard[k * local:(k + 1) * local]
      x = np.zeros((local,) + self.info.image_shape, np.float32)
      y = np.zeros((local,), np.int32)
      mask = np.zeros((local,), np.float32)
      x[:len(idx)] = self.standardize_images(images[idx])
      y[:len(idx)] = labels[idx]
      mask[:len(idx)] = 1.0
      yield {"image": self._device_shape(x), "label": self._device_shape(y),
             "mask": self._device_shape(mask)}

  def probe_batch(self, n: int, split: str = "train") -> dict[str, np.ndarray]:
    """The first n examples of `split`, standardized, unaugmented, unsharded:
    {"image": float32 `[n, H, W, C]`, "label": int32 `[n]`}."""
    images, labels = self._split(split)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(labels):
      raise ValueError(f"probe_batch n={n!r} must be an integer in [1, {len(labels)}] "
                       f"(the {split} split's size)")
    return {"image": self.standardize_images(images[:n]),
            "label": np.asarray(labels[:n], np.int32)}


class _Failure:
  def __init__(self, exc: BaseException):
    self.exc = exc


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> None:
  """Blocks until `item` is queued or `stop` is set (then drops it)."""
  while not stop.is_set():
    try:
      out.put(item, timeout=0.1)
      return
    except queue.Full:
      continue


def _produce(ds: Dataset, epoch: int, step: int, out: queue.Queue,
             stop: threading.Event) -> None:
  """Background producer: batches from (epoch, step) on, until `stop` is set.

  Holds no reference to the iterator, so a dropped iterator is collected and its
  `__del__` stops this thread.
  """
  perm_epoch, perm = None, None
  try:
    while not stop.is_set():
      if perm_epoch != epoch:
        perm_epoch, perm = epoch, ds.epoch_permutation(epoch)
      _put(out, ds.train_batch(epoch, step, perm), stop)
      step += 1
      if step == ds.steps_per_epoch:
        epoch, step = epoch + 1, 0
  except BaseException as e:  # hand the error to the consumer instead of dying silently
    _put(out, _Failure(e), stop)


class TrainIterator:
  """Endless training batches from a position; `get_state()` is the position of the
  next batch the caller will receive (not of what the prefetcher has prepared)."""

  def __init__(self, dataset: Dataset, epoch: int, step: int, prefetch: int = 2):
    if prefetch < 0:
      raise ValueError(f"prefetch={prefetch!r} must be >= 0")
    self._ds = dataset
    self._epoch, self._step = epoch, step
    self._perm_epoch, self._perm = None, None   # the synchronous path's cached order
    self._stop = threading.Event()
    self._queue: Optional[queue.Queue] = None
    self._thread: Optional[threading.Thread] = None
    if prefetch > 0:
      self._queue = queue.Queue(maxsize=prefetch)
      self._thread = threading.Thread(
          target=_produce, args=(dataset, epoch, step, self._queue, self._stop),
          name="lipnorm-data-prefetch", daemon=True)
      self._thread.start()

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._stop.is_set():
      raise StopIteration
    if self._queue is None:
      if self._perm_epoch != self._epoch:  # one permutation per epoch, not per batch
        self._perm_epoch, self._perm = self._epoch, self._ds.epoch_permutation(self._epoch)
      batch = self._ds.train_batch(self._epoch, self._step, self._perm)
    else:
      batch = self._queue.get()
      if isinstance(batch, _Failure):
        self.close()
        raise batch.exc
    self._step += 1
    if self._step == self._ds.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    return batch

  def get_state(self) -> dict:
    """JSON-serializable position: pass to `Dataset.train_iterator(state)` to resume."""
    return {"version": STATE_VERSION, "epoch": self._epoch, "step": self._step,
            "seed": self._ds.seed, "batch_size": self._ds.batch_size,
            "num_train": self._ds.info.num_train, "source": self._ds.info.name}

  def close(self) -> None:
    """Stops the prefetch thread (further `next` raises StopIteration)."""
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=5)

  def __del__(self):
    self._stop.set()

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def get_dataset(data_config: Any, *, seed: int, num_local_devices: int,
                process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> Dataset:
  """Loads `data_config.source` and returns a `Dataset` ready to iterate.

  data_config (ConfigDict, dict or any attribute object) fields:
    source: a name from `dataset_names()` ("digits", "cifar10", "tfds:cifar10", ...).
    data_dir: folder of the local files / TFDS data_dir (None: documented defaults).
    batch_size: global training batch (over all processes and devices).
    eval_batch_size: global evaluation batch (default: batch_size).
    augment: None (default: crop+flip for CIFAR sources, off otherwise) or bool.
    standardize: per-channel standardization from the training split (default True).
    num_train, num_test: use only the first n examples of a split (default: all).
    digits_test_fraction: test share of the stratified digits split (default 0.2).
    prefetch: training batches prepared ahead in a thread (default 2; 0 = none).
    crop_padding: pixels of zero padding for the random crop (default 4).
    download: fetch the official files when missing (default False: offline only).
  process_index / process_count default to `jax.process_index()` / `jax.process_count()`.
  """
  source_name = _field(data_config, "source", "digits")
  source = get_source(source_name)   # ValueError listing valid names
  if process_index is None or process_count is None:
    import jax  # only for the process topology; no model code
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  batch_size = _field(data_config, "batch_size", None)
  eval_batch_size = _field(data_config, "eval_batch_size", batch_size)
  check_geometry(batch_size, eval_batch_size, num_local_devices, process_index,
                 process_count)  # before any loading
  augment = _field(data_config, "augment", None)
  if augment is None:
    augment = source.augment_by_default
  if not isinstance(augment, (bool, np.bool_)):
    raise ValueError(f"data.augment={augment!r} must be True, False or None")
  standardize = _field(data_config, "standardize", True)
  if not isinstance(standardize, (bool, np.bool_)):
    raise ValueError(f"data.standardize={standardize!r} must be True or False")
  num_train = _positive_int("num_train", _field(data_config, "num_train"), allow_none=True)
  num_test = _positive_int("num_test", _field(data_config, "num_test"), allow_none=True)
  prefetch = _field(data_config, "prefetch", 2)
  if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
    raise ValueError(f"data.prefetch={prefetch!r} must be a non-negative integer")
  crop_padding = _field(data_config, "crop_padding", 4)
  if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
    raise ValueError(f"data.crop_padding={crop_padding!r} must be a non-negative integer")
  data_dir = _field(data_config, "data_dir")
  request = LoadRequest(
      data_dir=str(data_dir) if data_dir else None, num_train=num_train, num_test=num_test,
      digits_test_fraction=float(_field(data_config, "digits_test_fraction", 0.2)),
      download=bool(_field(data_config, "download", False)))
  splits = load_splits(source_name, request)
  return Dataset(splits, seed=seed, batch_size=int(batch_size),
                 eval_batch_size=int(eval_batch_size),
                 num_local_devices=int(num_local_devices), process_index=int(process_index),
                 process_count=int(process_count), augment=bool(augment),
                 standardize=bool(standardize), num_train=num_train, num_test=num_test,
                 prefetch=prefetch, crop_padding=crop_padding)
