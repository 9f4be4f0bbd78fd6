"""train.py in separate processes (bad flags: test_training_cli.py): SIGTERM leaves a
resumable checkpoint; two processes joined by `jax.distributed.initialize` on 127.0.0.1 agree
with one process."""
import json
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from lipnorm.training import EXIT_CODES, load_checkpoint, train
from lipnorm.training.metrics_writer import read_metrics
from training_helpers import finish, launch_train_py, tiny_cli_flags, tiny_config



def _launch(flags: list[str], devices: int) -> subprocess.Popen:
  return launch_train_py(flags, devices, merge_stderr=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
  return finish(proc, timeout)[:2]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path):
  changes = {"num_train_steps": 100_000, "schedule.name": "constant", "log_every_steps": 5,
             "eval_every_steps": 100_000, "checkpoint_every_steps": 100_000}
  proc = _launch(tiny_cli_flags(**changes) + [f"--workdir={tmp_path}"], devices=4)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 180
  while not any(r["kind"] == "train" for r in read_metrics(str(metrics))):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail(f"train.py never logged a train record:\n{proc.communicate()[0][-3000:]}")
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  code, out = _finish(proc, timeout=120)
  assert code == EXIT_CODES["preempted"] == 4, out[-3000:]
  assert "received SIGTERM" in out and "rerun the same command to resume" in out
  summary = json.loads((tmp_path / "summary.json").read_text())
  stopped = summary["step"]
  assert summary["status"] == "preempted" and summary["last_checkpoint_step"] == stopped > 0

  # What a kill -9 during a later save / log write leaves behind must not matter.
  (tmp_path / "checkpoints" / f"{stopped + 7}.orbax-checkpoint-tmp-1234").mkdir()
  with open(metrics, "a") as f:
    f.write('{"step": 99999, "kind": "tra')
  changes["num_train_steps"] = stopped + 3
  resumed = train(tiny_config(**changes), str(tmp_path), override_config=True,
                  interactive=False)
  assert resumed["status"] == "completed" and resumed["resumed_from_step"] == stopped
  assert resumed["step"] == stopped + 3
  assert not any("tmp" in p for p in os.listdir(tmp_path / "checkpoints"))
  assert max(r["step"] for r in read_metrics(str(metrics))) == stopped + 3


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
  changes = {"schedule.name": "constant", "bn_stats": "global", "log_every_steps": 2,
             "eval_every_steps": 2, "checkpoint_every_steps": 2}
  single = train(tiny_config(**changes, num_train_steps=6), str(tmp_path / "one"),
                 interactive=False)
  assert single["status"] == "completed"

  def run_pair(steps: int, extra: list[str]):
    port = _free_port()
    procs = [_launch(tiny_cli_flags(**changes, num_train_steps=steps) + extra + [
        f"--workdir={tmp_path / 'two'}", "--config.distributed.mode=on",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
        "--config.distributed.initialization_timeout_s=60"], devices=2) for i in range(2)]
    for code, out in [_finish(p, timeout=240) for p in procs]:
      assert code == 0, out[-3000:]

  run_pair(4, [])                          # 4 steps, then a 2-process resume to 6
  run_pair(6, ["--override_config"])
  one, two = load_checkpoint(str(tmp_path / "one")), load_checkpoint(str(tmp_path / "two"))
  assert one["step"] == two["step"] == 6
  for a, b in zip(jax.tree.leaves(one["state"]), jax.tree.leaves(two["state"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert two["data"]["process_count"] == 2 and len(two["data"]["iterators"]) == 2
  records = read_metrics(str(tmp_path / "two" / "metrics.jsonl"))
  events = [r["event"] for r in records if r["kind"] == "event"]
  assert events.count("start") == 1 and events.count("resumed") == 1   # process 0 only
  ev_one = [r for r in read_metrics(str(tmp_path / "one" / "metrics.jsonl"))
            if r["kind"] == "eval"]
  ev_two = [r for r in records if r["kind"] == "eval"]
  assert [r["step"] for r in ev_one] == [r["step"] for r in ev_two] == [2, 4, 6]
  for a, b in zip(ev_one, ev_two):
    assert a["num_examples"] == b["num_examples"] == 24
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
