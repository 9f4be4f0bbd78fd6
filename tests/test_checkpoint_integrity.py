"""Checkpoint integrity: damaged checkpoints (flipped bytes, truncated / deleted files, an
emptied directory) at the newest and at older steps are skipped with a warning, the newest
intact one is restored, retention never drops the last intact one, and end-to-end runs
resume from an older intact checkpoint to the same weights as an uninterrupted run."""
import json
import os
import pathlib
import shutil
import signal
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lipnorm.training import ConfigError, Hook, load_checkpoint, train
from lipnorm.training.checkpointing import (CORRUPT_DIR, Checkpointer,
                                            CorruptCheckpointError, NoIntactCheckpointError)
from training_helpers import finish, launch_train_py, tiny_cli_flags, tiny_config



# ------------------------------------------------------------------ damage to one step dir

def _raw_restore(state_dir: pathlib.Path):
  """The `state` item as Orbax reads it (no checksums), or the exception it raises."""
  try:
    return jax.tree.leaves(ocp.StandardCheckpointer().restore(state_dir))
  except Exception as e:  # noqa: BLE001
    return e


def _flip_bytes(path: pathlib.Path):
  raw = bytearray(path.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 8] = bytes(b ^ 0xFF for b in raw[mid:mid + 8])
  path.write_bytes(bytes(raw))


def _array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest data file of the `state` item whose middle 8 bytes reach the restored
  arrays. (OCDBT keeps some values twice, inline in the merged tree and in the per-process
  log; damage to the unused copy cannot change what a restore returns.)"""
  state_dir = step_dir / "state"
  files = sorted((p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
                 key=lambda p: p.stat().st_size, reverse=True)
  baseline = _raw_restore(state_dir)
  for f in files:
    with tempfile.TemporaryDirectory() as tmp:
      trial = pathlib.Path(tmp) / "state"
      shutil.copytree(state_dir, trial)
      _flip_bytes(trial / f.relative_to(state_dir))
      got = _raw_restore(trial)
      if isinstance(got, Exception) or any(
          not np.array_equal(a, b) for a, b in zip(got, baseline)):
        return f
  raise AssertionError(f"no data file under {state_dir} reaches the restored arrays")


def _flip(step_dir):
  _flip_bytes(_array_file(step_dir))


def _truncate(step_dir):
  path = _array_file(step_dir)
  os.truncate(path, path.stat().st_size // 2)


def _delete(step_dir):
  _array_file(step_dir).unlink()


def _empty(step_dir):
  for p in step_dir.iterdir():
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def _edit_iterators(step_dir):
  path = step_dir / "data" / "metadata"
  data = json.loads(path.read_text())
  data["iterators"][0]["pos"] += 1
  path.write_text(json.dumps(data))


DAMAGE = {"flip8": _flip, "truncate": _truncate, "delete": _delete, "empty": _empty}


# ------------------------------------------------------------------ Checkpointer alone

def _state(step):
  return {"params": {"w": np.arange(2000, dtype=np.float32).reshape(20, 100) + step,
                     "b": np.full(3, step, np.float32)},
          "step": np.array(step, np.int32)}


def _write(workdir, steps, keep=3):
  ck = Checkpointer(str(workdir), keep=keep)
  for s in steps:
    ck.save(s, _state(s), [{"pos": s}])
  ck.wait()
  ck.close()
  return pathlib.Path(workdir) / "checkpoints"


def _assert_state(got, step):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(_state(step))):
    np.testing.assert_array_equal(np.asarray(a), b)


def _skipped(caplog, directory, step):
  return [r.getMessage() for r in caplog.records
          if r.getMessage().startswith(f"skipping checkpoint {directory}/{step}:")]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_is_skipped_and_older_restored(tmp_path, caplog, damage):
  ckdir = _write(tmp_path, [0, 4, 8])
  DAMAGE[damage](ckdir / "8")
  ck = Checkpointer(str(tmp_path), keep=3)
  try:
    assert ck.latest_step() == 4
    msgs = _skipped(caplog, ckdir, 8)
    assert len(msgs) == 1 and "\n" not in msgs[0]
    state, it = ck.restore(4, _state(0))
    _assert_state(state, 4)
    assert it == {"pos": 4}
    assert ck.intact_steps() == [0, 4]
    # Training reaches step 8 again: the damaged one is moved aside, not overwritten.
    ck.save(8, _state(8), [{"pos": 8}])
    ck.wait()
    assert ck.latest_step() == 8 and ck.intact_steps() == [0, 4, 8]
    assert (tmp_path / CORRUPT_DIR / "8").is_dir()
    _assert_state(ck.restore(8, _state(0))[0], 8)
  finally:
    ck.close()
  # What was moved aside is the damaged copy, kept for inspection.
  inspect = tmp_path / "inspect" / "checkpoints"
  shutil.copytree(tmp_path / CORRUPT_DIR / "8", inspect / "8")
  with pytest.raises(CorruptCheckpointError, match=r"checkpoints/8: (unreadable|sha256)"):
    load_checkpoint(str(inspect.parent), step=8)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_older_is_skipped_and_never_collected(tmp_path, caplog, damage):
  ckdir = _write(tmp_path, [0, 4, 8])
  DAMAGE[damage](ckdir / "4")
  ck = Checkpointer(str(tmp_path), keep=3)
  try:
    assert ck.latest_step() == 8            # the newest is intact: nothing skipped
    assert not _skipped(caplog, ckdir, 8)
    assert ck.intact_steps() == [0, 8]
    assert _skipped(caplog, ckdir, 4) == []  # intact_steps does not warn
    for s in (12, 16):
      ck.save(s, _state(s), [{"pos": s}])
    ck.wait()
    # keep=3 intact ones (8, 12, 16); 0 was collected; the damaged 4 is left alone.
    assert sorted(ck.all_steps()) == [4, 8, 12, 16]
    assert ck.intact_steps() == [8, 12, 16]
  finally:
    ck.close()
  assert load_checkpoint(str(tmp_path))["step"] == 16
  with pytest.raises(CorruptCheckpointError, match=r"checkpoints/4"):
    load_checkpoint(str(tmp_path), step=4)


def test_edited_iterator_positions_are_detected(tmp_path, caplog):
  ckdir = _write(tmp_path, [0, 4])
  _edit_iterators(ckdir / "4")
  ck = Checkpointer(str(tmp_path), keep=3)
  try:
    assert ck.latest_step() == 0
    assert "data-iterator positions" in _skipped(caplog, ckdir, 4)[0]
  finally:
    ck.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_nothing_intact_is_one_clear_error(tmp_path, damage):
  ckdir = _write(tmp_path, [0, 4, 8])
  for s in (0, 4, 8):
    DAMAGE[damage](ckdir / str(s))
  ck = Checkpointer(str(tmp_path), keep=3)
  try:
    with pytest.raises(NoIntactCheckpointError) as info:
      ck.latest_step()
  finally:
    ck.close()
  msg = str(info.value)
  assert isinstance(info.value, ConfigError) and "\n" not in msg
  assert msg.startswith(f"no intact checkpoint in {ckdir}; tried step 8: ")
  assert msg.index("step 8:") < msg.index("step 4:") < msg.index("step 0:")
  assert sorted(os.listdir(ckdir)) == ["0", "4", "8"]   # nothing deleted
  with pytest.raises(NoIntactCheckpointError):
    load_checkpoint(str(tmp_path))


def test_retention_keeps_last_intact_when_the_new_save_is_corrupt(tmp_path):
  """keep=1: the older checkpoint is only collected once the newer one read back intact."""
  ck = Checkpointer(str(tmp_path), keep=1)
  try:
    ck.save(0, _state(0), [{"pos": 0}])
    ck.save(4, _state(4), [{"pos": 4}])
    ck._manager.wait_until_finished()   # step 4 is on disk; not yet verified or collected
    _flip(tmp_path / "checkpoints" / "4")
    ck.wait()
    assert sorted(ck.all_steps()) == [0, 4] and ck.latest_step() == 0
    ck.save(8, _state(8), [{"pos": 8}])
    ck.wait()
    assert sorted(ck.all_steps()) == [4, 8] and ck.latest_step() == 8
  finally:
    ck.close()


def test_checkpoint_without_checksums_is_used_with_a_warning(tmp_path, caplog):
  """Checkpoints written before checksums existed still resume."""
  directory = tmp_path / "checkpoints"
  with ocp.CheckpointManager(str(directory), item_names=("state", "data"),
                             options=ocp.CheckpointManagerOptions(create=True)) as m:
    m.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(3)),
                                      data=ocp.args.JsonSave({"process_count": 1,
                                                              "iterators": [{"pos": 3}]})))
    m.wait_until_finished()
  ck = Checkpointer(str(tmp_path), keep=3)
  try:
    assert ck.latest_step() == 3
    _assert_state(ck.restore(3, _state(0))[0], 3)
  finally:
    ck.close()
  assert any("has no checksums" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted tiny run: checkpoints 0, 4, 8."""
  workdir = tmp_path_factory.mktemp("reference")
  summary = train(tiny_config(), str(workdir), interactive=False)
  assert summary["status"] == "completed"
  return workdir, load_checkpoint(str(workdir))


def _assert_same_finite_state(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    assert np.isfinite(np.asarray(x, np.float64)).all()
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_completed_run_with_corrupt_last_checkpoint_retrains_it(reference_run, tmp_path,
                                                                caplog):
  ref_dir, ref = reference_run
  workdir = tmp_path / "w"
  shutil.copytree(ref_dir, workdir)
  _flip(workdir / "checkpoints" / "8")
  summary = train(tiny_config(), str(workdir), interactive=False)
  assert summary["status"] == "completed" and summary["step"] == 8
  assert summary["resumed_from_step"] == 4 and summary["last_checkpoint_step"] == 8
  assert _skipped(caplog, workdir / "checkpoints", 8)
  again = load_checkpoint(str(workdir))
  assert again["step"] == 8
  _assert_same_finite_state(again["state"], ref["state"])   # resume is bitwise exact
  assert (workdir / CORRUPT_DIR / "8").is_dir()


@pytest.mark.slow
def test_unfinished_run_with_corrupt_last_checkpoint_resumes_older(reference_run, tmp_path):
  _, ref = reference_run

  def sigterm_at_4(step, variables, probe_batch):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return {}

  part = train(tiny_config(), str(tmp_path), interactive=False,
               extra_hooks=[Hook("sigterm", every=1, fn=sigterm_at_4)])
  assert part["status"] == "preempted" and part["last_checkpoint_step"] == 5
  _truncate(tmp_path / "checkpoints" / "5")
  summary = train(tiny_config(), str(tmp_path), interactive=False)
  assert summary["status"] == "completed" and summary["resumed_from_step"] == 4
  final = load_checkpoint(str(tmp_path))
  assert final["step"] == 8
  _assert_same_finite_state(final["state"], ref["state"])


def test_train_with_no_intact_checkpoint_raises_config_error(reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = tmp_path / "w"
  shutil.copytree(ref_dir, workdir)
  for s in (0, 4, 8):
    _flip(workdir / "checkpoints" / str(s))
  with pytest.raises(NoIntactCheckpointError, match=r"no intact checkpoint in .*tried step 8"):
    train(tiny_config(), str(workdir), interactive=False)


@pytest.mark.slow
def test_cli_exits_2_when_no_checkpoint_is_intact(reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = tmp_path / "w"
  shutil.copytree(ref_dir, workdir)
  for s in (0, 4, 8):
    _empty(workdir / "checkpoints" / str(s))
  code, _, err = finish(launch_train_py([*tiny_cli_flags(), f"--workdir={workdir}"]), 600)
  assert code == 2, err[-2000:]
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "no intact checkpoint" in lines[0]


def test_optimizer_states_with_empty_nodes_checksum_and_verify(tmp_path):
  """An optax chain whose first state is empty (weight decay 0, a constant schedule) once
  broke the checksum's flattening; its live and target-less restored key paths agree."""
  import optax
  params = {"w": np.arange(4.0, dtype=np.float32).reshape(2, 2)}
  tx = optax.chain(optax.add_decayed_weights(0.0),
                   optax.sgd(optax.constant_schedule(0.1), momentum=0.9))
  state = jax.tree.map(np.asarray, {"params": params, "opt_state": tx.init(params)})
  ckpt = Checkpointer(str(tmp_path), keep=2, async_save=False)
  ckpt.save(3, state, [{"position": 0}])
  assert ckpt.latest_step() == 3 and ckpt.intact_steps() == [3]
  restored, _ = ckpt.restore(3, state)
  np.testing.assert_array_equal(restored["params"]["w"], params["w"])
