"""A tiny in-memory dataset with the `lipnorm.data` interface, for training tests only.

Labels come from a fixed random linear teacher, so a model can learn them. The global
batch order depends only on the seed (not on the process count): process p of P takes
rows [p*B/P, (p+1)*B/P) of each global batch, which is what lets a 2-process run be
compared with a 1-process run.
"""
from __future__ import annotations

import types

import numpy as np

from lipnorm.training import base_config


class _Iterator:
  def __init__(self, ds, state):
    self.ds = ds
    self.state = dict(state or {"epoch": 0, "index": 0})

  def get_state(self) -> dict:
    return dict(self.state)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    ds, b = self.ds, self.ds.batch_size
    if self.state["index"] + b > ds.num_train:
      self.state = {"epoch": self.state["epoch"] + 1, "index": 0}
    order = np.random.default_rng([ds.seed, self.state["epoch"]]).permutation(ds.num_train)
    rows = order[self.state["index"]:self.state["index"] + b]
    self.state["index"] += b
    return ds.local_view(ds.train_x[rows], ds.train_y[rows])


class FakeDataset:
  """`info`, `train_iterator(state)`, `eval_batches(split)`, `probe_batch(n)`."""

  def __init__(self, data_config, *, seed, num_local_devices, process_index, process_count,
               image_shape=(4, 4, 1), num_classes=3, num_train=64, num_test=24):
    self.batch_size = data_config.batch_size
    self.eval_batch_size = data_config.eval_batch_size
    self.seed, self.num_train = seed, num_train
    self.devices, self.pi, self.pc = num_local_devices, process_index, process_count
    rng = np.random.default_rng(1234)
    dim = int(np.prod(image_shape))
    teacher = rng.normal(size=(dim, num_classes))
    x = rng.normal(size=(num_train + num_test, *image_shape)).astype(np.float32)
    y = np.argmax(x.reshape(len(x), -1) @ teacher, axis=1).astype(np.int32)
    self.train_x, self.train_y = x[:num_train], y[:num_train]
    self.test_x, self.test_y = x[num_train:], y[num_train:]
    self.info = types.SimpleNamespace(
        name="fake", image_shape=tuple(image_shape), num_classes=num_classes,
        num_train=num_train, num_test=num_test, mean=0.0, std=1.0)

  def local_view(self, *arrays):
    """Global-batch arrays -> this process's rows, shaped [local_devices, per_device, ...]."""
    out = []
    for a in arrays:
      part = np.split(a, self.pc)[self.pi]
      out.append(part.reshape(self.devices, -1, *a.shape[1:]))
    if len(arrays) == 2:
      return {"image": out[0], "label": out[1]}
    return {"image": out[0], "label": out[1], "mask": out[2]}

  def train_iterator(self, state=None):
    return _Iterator(self, state)

  def eval_batches(self, split="test"):
    assert split == "test"
    b = self.eval_batch_size
    n = len(self.test_x)
    for start in range(0, n, b):
      x, y = self.test_x[start:start + b], self.test_y[start:start + b]
      mask = np.ones(len(x), np.float32)
      pad = b - len(x)
      if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros(pad, y.dtype)])
        mask = np.concatenate([mask, np.zeros(pad, np.float32)])
      yield self.local_view(x, y, mask)

  def probe_batch(self, n):
    return {"image": self.train_x[:n], "label": self.train_y[:n]}


def fake_dataset_fn(**overrides):
  """A `dataset_fn` for `lipnorm.training.train` building a FakeDataset."""
  def fn(data_config, **kwargs):
    return FakeDataset(data_config, **kwargs, **overrides)
  return fn


def tiny_config(**changes):
  """A 3-layer width-16 BN net on FakeDataset, 8 steps; `changes` maps dotted keys to values."""
  c = base_config()
  c.model.depth, c.model.width, c.model.norm = 3, 16, "batch"
  c.bn_stats = "per_device"
  c.data.batch_size, c.data.eval_batch_size = 12, 8    # 64 examples: 5 batches per epoch
  c.num_train_steps = 8
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 4, 8, 4
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
