"""End-to-end `train()` runs on 64 digits with 4 simulated devices: outputs, bitwise
resume, divergence, hooks, workdir config checks."""
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from lipnorm.training import EXIT_CODES, Hook, base_config, load_checkpoint, train
from lipnorm.training.metrics_writer import read_metrics
from training_helpers import tiny_config



def _sigterm_at(step_to_signal):
  def fn(step, variables, probe_batch):
    if step == step_to_signal:
      os.kill(os.getpid(), signal.SIGTERM)
    return {}
  return Hook("sigterm", every=1, fn=fn)


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


PROBE_CALLS = []


def _probe(step, variables, batch):
  PROBE_CALLS.append(step)
  assert set(variables) == {"params", "batch_stats"}
  assert batch["image"].shape == (5, 8, 8, 1)
  return {"kernel0_fro": float(np.linalg.norm(variables["params"]["dense_0"]["kernel"])),
          "per_layer": [1.0, 2.0]}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """One uninterrupted 8-step run (with a probe hook), shared by the tests below."""
  workdir = tmp_path_factory.mktemp("full")
  summary = train(tiny_config(**{"probes.batch_size": 5}), str(workdir),
                  extra_hooks=[Hook("norms", 3, _probe)], interactive=False)
  return workdir, summary


@pytest.mark.slow
def test_outputs_and_metrics_format(full_run):
  tmp_path, summary = full_run
  assert summary["status"] == "completed" and summary["step"] == 8
  assert summary["final"]["eval_accuracy"] is not None and summary["steps_per_sec"] > 0
  assert PROBE_CALLS == [0, 3, 6, 8]
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["status"] == "completed" and on_disk["final"] == summary["final"]
  assert json.loads((tmp_path / "config.json").read_text())["model"]["norm"] == "batch"
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))

  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert all({"step", "kind", "time"} <= set(r) for r in records)
  train_recs = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train_recs] == [4, 8]
  assert all(r["window_steps"] == 4 and np.isfinite(r["loss"]) for r in train_recs)
  assert [r["step"] for r in records if r["kind"] == "eval"] == [8]
  probes = [r for r in records if r["kind"] == "probe"]
  assert [r["step"] for r in probes] == [0, 3, 6, 8]
  assert probes[0]["hook"] == "norms" and probes[0]["per_layer"] == [1.0, 2.0]
  events = [r["event"] for r in records if r["kind"] == "event"]
  assert events[0] == "start" and events[-1] == "completed"
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [0, 4, 8]


@pytest.mark.slow
def test_resume_is_bitwise_identical(full_run, tmp_path):
  config = tiny_config(**{"probes.batch_size": 5})
  part = train(config, str(tmp_path),
               extra_hooks=[_sigterm_at(2)], interactive=False)
  # The signal lands during step 2's boundary; the loop stops at the next boundary it
  # reaches (step 3: the hook's), mid-epoch, with a checkpoint there.
  assert part["status"] == "preempted" and part["step"] == 3
  assert part["last_checkpoint_step"] == 3
  resumed = train(config, str(tmp_path), interactive=False)
  assert resumed["status"] == "completed" and resumed["resumed_from_step"] == 3
  a = load_checkpoint(str(full_run[0]))
  b = load_checkpoint(str(tmp_path))
  assert a["step"] == b["step"] == 8
  _assert_trees_equal(a["state"], b["state"])
  # Each step is logged once, and the resumed run logged what the uninterrupted one did.
  recs_a = read_metrics(str(full_run[0] / "metrics.jsonl"))
  recs_b = read_metrics(str(tmp_path / "metrics.jsonl"))
  for kind in ("train", "eval"):
    a_ = [(r["step"], r["loss"]) for r in recs_a if r["kind"] == kind]
    b_ = [(r["step"], r["loss"]) for r in recs_b if r["kind"] == kind]
    assert a_[-1] == b_[-1] and len({s for s, _ in b_}) == len(b_)
  assert [r["event"] for r in recs_b if r["kind"] == "event"].count("resumed") == 1


def test_divergence_stops_keeps_last_finite_checkpoint(tmp_path):
  # lr 1e30 without normalization: step 1 (from init) is finite, the update then blows
  # the weights up and step 2's loss is not.
  config = tiny_config(**{"model.norm": "none", "optimizer.learning_rate": 1e30,
                          "schedule.name": "constant", "checkpoint_every_steps": 1,
                          "num_train_steps": 50, "log_every_steps": 10})
  summary = train(config, str(tmp_path), interactive=False)
  assert summary["status"] == "diverged" and EXIT_CODES["diverged"] == 3
  assert summary["diverged_step"] == 2 and summary["step"] == 2
  assert summary["last_checkpoint_step"] == 1
  ckpt = load_checkpoint(str(tmp_path))
  assert ckpt["step"] == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ckpt["state"]))
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  diverged = [r for r in records if r.get("event") == "diverged"]
  assert len(diverged) == 1 and diverged[0]["diverged_step"] == 2
  assert "loss" in diverged[0]["nonfinite"]
  last_train = [r for r in records if r["kind"] == "train"][-1]
  assert last_train["loss"] is None                # non-finite written as JSON null
  assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.slow
def test_workdir_with_other_config_is_refused_unless_overridden(full_run, tmp_path):
  from lipnorm.training import ConfigError
  shutil.copytree(full_run[0], tmp_path / "w")
  workdir = str(tmp_path / "w")
  other = tiny_config(**{"probes.batch_size": 5, "num_train_steps": 10})
  with pytest.raises(ConfigError, match=r"num_train_steps: 8 -> 10.*--override_config"):
    train(other, workdir, interactive=False)
  summary = train(other, workdir, interactive=False,
                  override_config=True)
  assert summary["status"] == "completed" and summary["resumed_from_step"] == 8
  assert summary["step"] == 10
  events = [r for r in read_metrics(workdir + "/metrics.jsonl") if r["kind"] == "event"]
  assert any(e["event"] == "config_override" for e in events)
  assert json.loads((tmp_path / "w" / "config.json").read_text())["num_train_steps"] == 10
  wider = tiny_config(**{"probes.batch_size": 5, "num_train_steps": 10, "model.width": 32})
  with pytest.raises(ConfigError, match=r"cannot resume .*checkpoints/10 .*new workdir"):
    train(wider, workdir, interactive=False, override_config=True)


def test_summary_has_every_field_and_hook_time(full_run):
  from lipnorm.training.run_log import SUMMARY_FIELDS
  _, summary = full_run
  assert set(summary) == set(SUMMARY_FIELDS)
  assert summary["probes"]["norms"]["step"] == 8 and "kernel0_fro" in summary["probes"]["norms"]
  assert summary["hook_time_s"]["norms"] > 0
  assert 0 < summary["probe_time_share"] < 1


@pytest.mark.slow
def test_probe_time_share_is_measured_around_hook_calls(tmp_path):
  import time

  def slow(step, variables, batch):
    time.sleep(0.3)
    return {"x": 1.0}

  summary = train(tiny_config(**{"num_train_steps": 4}), str(tmp_path),
                  extra_hooks=[Hook("slow", 2, slow)], interactive=False)
  # called at steps 0, 2, 4: at least 0.9 s of this call's wall time
  assert summary["hook_time_s"]["slow"] >= 0.9
  share = summary["probe_time_share"]
  np.testing.assert_allclose(share, summary["hook_time_s"]["slow"] / summary["wall_time_s"])
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["probe_time_share"] == pytest.approx(share)


def test_rerunning_a_completed_run_changes_nothing(full_run, tmp_path):
  shutil.copytree(full_run[0], tmp_path / "w")
  workdir = tmp_path / "w"
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  summary = train(tiny_config(**{"probes.batch_size": 5}), str(workdir), interactive=False)
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert after == before                     # no file written, removed or changed
  assert summary == json.loads((workdir / "summary.json").read_text())
  assert summary["probes"]["norms"]["step"] == 8 and summary["steps_per_sec"] > 0


@pytest.mark.slow
def test_resumed_summary_keeps_earlier_probes(tmp_path):
  config = tiny_config(**{"probes.batch_size": 5})
  calls = []

  def once(step, variables, batch):
    calls.append(step)
    return {"value": float(step)}
  part = train(config, str(tmp_path), interactive=False,
               extra_hooks=[Hook("sometimes", 3, once), _sigterm_at(3)])
  assert part["status"] == "preempted" and part["probes"]["sometimes"]["step"] == 3
  # The resumed session runs no hook called "sometimes"; its summary still has it.
  done = train(config, str(tmp_path), interactive=False)
  assert done["status"] == "completed" and done["probes"]["sometimes"] == {
      "step": 3, "value": 3.0}


@pytest.mark.slow
def test_workdir_must_be_a_writable_directory(tmp_path):
  from lipnorm.training import ConfigError
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ConfigError, match=r"--workdir .*afile.* is not a directory"):
    train(tiny_config(), str(tmp_path / "afile"), interactive=False)
  with pytest.raises(ConfigError, match=r"--workdir .*afile/run.* is not writable"):
    train(tiny_config(), str(tmp_path / "afile" / "run"), interactive=False)
  if os.geteuid() == 0:
    pytest.skip("root writes into read-only directories; the permission case needs a user")
  ro = tmp_path / "ro"
  ro.mkdir(mode=0o555)
  with pytest.raises(ConfigError, match=r"--workdir .*ro.* is not writable"):
    train(tiny_config(), str(ro), interactive=False)


@pytest.mark.slow
def test_sigterm_before_the_loop_stops_at_the_first_boundary(tmp_path):
  """A preemption that arrives while the run is still being built (or compiling) is not
  lost or fatal: the run checkpoints and stops at its first step boundary."""
  from lipnorm.data import get_dataset

  def dataset_fn(data_config, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return get_dataset(data_config, **kwargs)

  summary = train(tiny_config(num_train_steps=50, log_every_steps=10), str(tmp_path),
                  dataset_fn=dataset_fn, interactive=False)
  assert summary["status"] == "preempted" and summary["step"] == 1
  assert load_checkpoint(str(tmp_path))["step"] == 1
