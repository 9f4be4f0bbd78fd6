"""Orbax checkpoints of the training state and the data-iterator positions, verified.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. `state` is the `TrainState` (host
numpy copies: params, batch_stats, opt_state, step, rng); `data` is JSON
`{"process_count": P, "iterators": [state of process 0's iterator, ...],
"checksums": {"algorithm": "sha256", "leaves": {"params/dense_0/kernel": hex, ...},
"iterators": hex}}`.

Atomicity: Orbax writes each step into a temporary directory and renames it when
complete (and marks it with `commit_success.txt`), so a run killed at any moment leaves
either a finished checkpoint or a temporary directory that the next manager removes
(`cleanup_tmp_directories`). The checksums live in the `data` item of the same step
directory, so they are committed by the same rename as the arrays they describe.

Integrity: a step counts as intact when it can be read and the sha256 of every restored
array (its dtype, shape and bytes) and of the iterator positions match the checksums.
`latest_step()` is the newest intact step: a corrupt or unreadable one is skipped with
one warning line naming it. When checkpoints exist but none is intact it raises
`NoIntactCheckpointError` (a `ConfigError`: exit code 2 from train.py), listing each
step tried and why it failed. Checkpoints written before checksums existed are restored
unverified (with a warning).

Retention: Orbax's own garbage collection is off. After a save is on disk it is read
back and verified; only then are older steps removed, and only intact ones beyond the
newest `keep` intact ones. So a corrupt newer checkpoint never causes the last intact
one to be collected, and a corrupt checkpoint is never deleted: when the run reaches
its step again it is moved to `<workdir>/checkpoints.corrupt/<step>` (kept for
inspection) and the step is written afresh.

Saving is asynchronous; `wait()` blocks until the last save is on disk. Every process
must call `save`, `restore`, `latest_step` and `wait` (they synchronize); only the
primary process writes the JSON item and moves corrupt steps aside.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from lipnorm.training.config_schema import ConfigError

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints.corrupt"   # sibling of CHECKPOINT_DIR: corrupt steps moved aside
CHECKSUM_ALGORITHM = "sha256"


class CheckpointError(ConfigError):
  """A checkpoint that cannot be used (train.py: exit code 2, one line)."""


class CorruptCheckpointError(CheckpointError):
  """The requested step is unreadable or does not match its checksums."""


class NoIntactCheckpointError(CheckpointError):
  """Checkpoints exist but none of them is intact."""


# ----------------------------------------------------------------------------- checksums

def _leaf_digest(x) -> str:
  """sha256 of one array's dtype, shape and C-order bytes."""
  a = np.ascontiguousarray(np.asarray(x))
  h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def _flat_leaves(tree) -> dict[str, Any]:
  """`{"params/dense_0/kernel": array, ...}`: the key paths Orbax stores. They are the
  same for the live `TrainState` and for a target-less restore (nested dicts / lists)."""
  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))
  return {"/".join(str(k) for k in path): leaf for path, leaf in flat.items()}


def _json_digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def compute_checksums(host_state, iterator_states: list) -> dict:
  """The checksums stored with a checkpoint (see the module docstring)."""
  return {"algorithm": CHECKSUM_ALGORITHM,
          "leaves": {k: _leaf_digest(v) for k, v in _flat_leaves(host_state).items()},
          "iterators": _json_digest(iterator_states)}


def checksum_problem(state, data) -> Optional[str]:
  """Why restored `state` / `data` do not match the checksums in `data` (None: they do,
  or `data` predates checksums, which is logged)."""
  if not isinstance(data, dict) or not isinstance(data.get("iterators"), list):
    return "its data item is not the expected JSON object"
  sums = data.get("checksums")
  if sums is None:
    return None   # written before checksums existed: caller warns
  if not isinstance(sums, dict) or sums.get("algorithm") != CHECKSUM_ALGORITHM:
    return f"unknown checksum record {str(sums)[:80]!r}"
  if _json_digest(data["iterators"]) != sums.get("iterators"):
    return "sha256 mismatch in the data-iterator positions"
  leaves, want = _flat_leaves(state), sums.get("leaves", {})
  if set(leaves) != set(want):
    missing, extra = sorted(set(want) - set(leaves)), sorted(set(leaves) - set(want))
    return (f"arrays differ from the recorded ones (missing: {missing[:3]}, "
            f"unexpected: {extra[:3]})")
  bad = [k for k in sorted(want) if _leaf_digest(leaves[k]) != want[k]]
  if bad:
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return f"sha256 mismatch in {bad[0]}{more}"
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- the manager

class _Verified:
  """Reads steps target-less and remembers which are intact (finished steps never change
  while a manager is open, except by outside damage that a restart picks up)."""

  def __init__(self, manager: ocp.CheckpointManager, directory: str):
    self._manager, self.directory = manager, directory
    self._problems: dict[int, Optional[str]] = {}

  def forget(self, step: int) -> None:
    self._problems.pop(step, None)

  def problem(self, step: int) -> Optional[str]:
    """None when `step` is intact, else a short reason."""
    if step not in self._problems:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
        problem = checksum_problem(restored.state, restored.data)
        if problem is None and "checksums" not in restored.data:
          logging.warning("checkpoint %s/%d has no checksums (written by an older lipnorm); "
                          "using it unverified", self.directory, step)
      except Exception as e:  # noqa: BLE001 -- Orbax / TensorStore raise many types
        problem = f"unreadable ({_first_line(e)})"
      self._problems[step] = problem
    return self._problems[step]

  def newest_intact(self, steps) -> Optional[int]:
    """The newest intact one of `steps`, warning once per skipped step; None when `steps`
    is empty; NoIntactCheckpointError when none is intact."""
    tried = []
    for step in sorted(steps, reverse=True):
      problem = self.problem(step)
      if problem is None:
        return step
      logging.warning("skipping checkpoint %s/%d: %s", self.directory, step, problem)
      tried.append(f"step {step}: {problem}")
    if not tried:
      return None
    raise NoIntactCheckpointError(
        f"no intact checkpoint in {self.directory}; tried {'; '.join(tried)}. Move that "
        f"folder aside (or use a new workdir) to start the run over")


class Checkpointer:
  """A layer over `ocp.CheckpointManager` that verifies checkpoints and keeps the newest
  `keep` intact ones (see the module docstring)."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    self.keep = int(keep)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))
    self._verified = _Verified(self._manager, self.directory)

  def latest_step(self) -> Optional[int]:
    """The newest intact step (None: no checkpoint yet). Waits for a pending save. Raises
    NoIntactCheckpointError when checkpoints exist but none is intact."""
    self._manager.wait_until_finished()
    return self._verified.newest_intact(self._manager.all_steps())

  def all_steps(self) -> list[int]:
    """Every finished step on disk, intact or not."""
    return list(self._manager.all_steps())

  def intact_steps(self) -> list[int]:
    """The finished steps that pass verification, oldest first."""
    self._manager.wait_until_finished()
    return [s for s in sorted(self._manager.all_steps()) if self._verified.problem(s) is None]

  def save(self, step: int, host_state, iterator_states: list[dict]) -> None:
    """Saves `host_state` (a numpy pytree), every process's iterator state and their
    checksums. A step already on disk is kept when intact, moved aside when corrupt."""
    self._manager.wait_until_finished()
    self._collect_garbage()
    if step in self._manager.all_steps():
      problem = self._verified.problem(step)
      if problem is None:
        return
      self._move_aside(step, problem)
    data = {"process_count": len(iterator_states), "iterators": iterator_states,
            "checksums": compute_checksums(host_state, iterator_states)}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(host_state), data=ocp.args.JsonSave(data)), force=True)

  def restore(self, step: int, host_target) -> tuple[Any, dict]:
    """-> (state with the structure of `host_target`, this process's iterator state).

    Raises ValueError for a state of another shape or structure (another config), and
    CorruptCheckpointError when the arrays do not match their checksums.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, host_target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    _check_shapes(restored.state, host_target)
    data = restored.data
    problem = checksum_problem(restored.state, data)
    if problem is not None:
      raise CorruptCheckpointError(f"checkpoint {self.directory}/{step}: {problem}")
    if data["process_count"] != jax.process_count():
      raise ValueError(
          f"checkpoint {self.directory}/{step} was written by {data['process_count']} "
          f"process(es); resume it with the same number (now {jax.process_count()})")
    return restored.state, data["iterators"][jax.process_index()]

  def wait(self) -> None:
    """Blocks until the last save is on disk, then verifies it and removes old steps."""
    self._manager.wait_until_finished()
    self._collect_garbage()

  def close(self) -> None:
    self._manager.close()

  def _collect_garbage(self) -> None:
    """Deletes intact steps older than the newest `keep` intact ones (never a corrupt
    one, never the newest intact one)."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    intact = [s for s in steps if self._verified.problem(s) is None]
    for step in intact[self.keep:]:
      self._manager.delete(step)
      self._verified.forget(step)

  def _move_aside(self, step: int, problem: str) -> None:
    """Moves a corrupt step out of the way of a fresh save (never deletes it)."""
    target = os.path.join(self.workdir, CORRUPT_DIR, str(step))
    n = 0
    while os.path.exists(target + (f".{n}" if n else "")):
      n += 1
    target += f".{n}" if n else ""
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
      logging.warning("checkpoint %s/%d is corrupt (%s); moved to %s and writing it again",
                      self.directory, step, problem, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"lipnorm_checkpoint_moved_{step}")
    self._manager.reload()
    self._verified.forget(step)


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

  `step=None`: the newest intact step (corrupt ones are skipped with a warning).
  Returns `{"step": int, "state": {"params", "batch_stats", "opt_state", "step", "rng"},
  "data": {"process_count", "iterators", "checksums"}}` with numpy leaves (optax named
  tuples come back as plain lists / dicts). Raises ValueError when there is no
  checkpoint, CorruptCheckpointError when `step` fails verification and
  NoIntactCheckpointError when no step is intact.
  """
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise ValueError(f"no checkpoint in {directory}")
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_names=("state", "data")) as manager:
    verified = _Verified(manager, directory)
    if step is None:
      step = verified.newest_intact(manager.all_steps())
      if step is None:
        raise ValueError(f"no checkpoint in {directory}")
    elif verified.problem(step) is not None:
      raise CorruptCheckpointError(f"checkpoint {directory}/{step}: {verified.problem(step)}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  return {"step": step, "state": restored.state, "data": restored.data}
