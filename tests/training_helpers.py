"""Shared by the training tests: a tiny config on a small subset of the embedded digits."""
from lipnorm.training import base_config


def set_fields(config, changes: dict):
  """Applies {"a.b": value} changes to a ConfigDict in place; returns it."""
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_config(**changes):
  """A 3-layer width-16 BN net on 64 digits (8x8x1, 10 classes), 8 steps of batch 12
  (5 batches per epoch, so runs cross epoch boundaries); `changes` maps dotted keys."""
  c = base_config()
  c.model.depth, c.model.width, c.model.norm = 3, 16, "batch"
  c.bn_stats = "per_device"
  c.data.source, c.data.num_train, c.data.num_test = "digits", 64, 24
  c.data.batch_size, c.data.eval_batch_size = 12, 8
  c.num_train_steps = 8
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 4, 8, 4
  return set_fields(c, changes)
