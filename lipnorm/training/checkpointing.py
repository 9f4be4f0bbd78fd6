"""Orbax checkpoints of the training state and the data-iterator positions.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. `state` is the `TrainState` (host
numpy copies: params, batch_stats, opt_state, step, rng); `data` is JSON
`{"process_count": P, "iterators": [state of process 0's iterator, ...]}`.

Orbax writes each step into a temporary directory and renames it when complete (and
marks it with `commit_success.txt`), so a run killed at any moment leaves either a
finished checkpoint or a temporary directory that `latest_step()` ignores and the next
manager removes (`cleanup_tmp_directories`). Saving is asynchronous; `wait()` blocks
until the last save is on disk. Every process must call `save` and `restore` (they
synchronize); only the primary process writes the JSON item.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
  """A thin layer over `ocp.CheckpointManager` keeping the last `keep` steps."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, host_state, iterator_states: list[dict]) -> None:
    """Saves `host_state` (a numpy pytree) and every process's iterator state."""
    if step in self._manager.all_steps():
      return
    data = {"process_count": len(iterator_states), "iterators": iterator_states}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(host_state), data=ocp.args.JsonSave(data)), force=True)

  def restore(self, step: int, host_target) -> tuple[Any, dict]:
    """-> (state with the structure of `host_target`, this process's iterator state)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, host_target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    _check_shapes(restored.state, host_target)
    data = restored.data
    if data["process_count"] != jax.process_count():
      raise ValueError(
          f"checkpoint {self.directory}/{step} was written by {data['process_count']} "
          f"process(es); resume it with the same number (now {jax.process_count()})")
    return restored.state, data["iterators"][jax.process_index()]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _check_shapes(restored, target) -> None:
  """Orbax returns stored shapes even when the target's differ: refuse a mismatch."""
  got = jax.tree_util.tree_flatten_with_path(restored)[0]
  want = jax.tree_util.tree_flatten_with_path(target)[0]
  if [p for p, _ in got] != [p for p, _ in want]:
    raise ValueError("checkpoint holds a differently structured state (other model or "
                     "optimizer)")
  for (path, a), (_, b) in zip(got, want):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"checkpoint has {jax.tree_util.keystr(path)} of shape "
                       f"{np.shape(a)}, this config needs {np.shape(b)}")


def load_checkpoint(workdir: str, step: Optional[int] = None) -> dict:
  """Reads a run's checkpoint without a target structure (for analysis and notebooks).

  Returns `{"step": int, "state": {"params", "batch_stats", "opt_state", "step", "rng"},
  "data": {"process_count", "iterators"}}` with numpy leaves (optax named tuples come
  back as plain lists / dicts).
  """
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_names=("state", "data")) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  return {"step": step, "state": restored.state, "data": restored.data}
