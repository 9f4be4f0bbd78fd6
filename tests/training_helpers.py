"""Shared by the training tests: configs/*.py loading and a tiny version of the default
config (64 digits, a 3-layer width-16 BN net, 8 steps), in Python or as CLI flags."""
import os
import pathlib
import subprocess
import sys

import pytest

from lipnorm.training.config_schema import load_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# configs/default.py made tiny: 64 training digits in batches of 12 (5 per epoch, so
# runs cross epoch boundaries), 24 test digits, 8 steps.
TINY_CHANGES = {
    "model.depth": 3, "model.width": 16, "model.norm": "batch", "bn_stats": "per_device",
    "data.num_train": 64, "data.num_test": 24, "data.batch_size": 12,
    "data.eval_batch_size": 8, "num_train_steps": 8, "log_every_steps": 4,
    "eval_every_steps": 8, "checkpoint_every_steps": 4,
    # The main job probes as it trains; the loop's own tests measure the loop alone
    # (probe hooks in training: tests/test_probe_hooks.py).
    "probes.enabled": False,
}


def load_config(name: str):
  """`configs/<name>.py`'s get_config()."""
  return load_config_file(str(CONFIGS / f"{name}.py"))


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
  """configs/default.py with TINY_CHANGES and then `changes` (dotted keys)."""
  return set_fields(load_config("default"), {**TINY_CHANGES, **changes})


def tiny_cli_flags(**changes) -> list[str]:
  """The same config as `tiny_config(**changes)`, as train.py flags."""
  return ["--config=" + str(CONFIGS / "default.py")] + [
      f"--config.{k}={v}" for k, v in {**TINY_CHANGES, **changes}.items()]


def launch_train_py(flags, devices: int = 4, merge_stderr: bool = False
                    ) -> subprocess.Popen:
  """`python train.py <flags>` with JAX set up like the test process (tests/conftest.py),
  so its numbers match in-process runs."""
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu",
         "JAX_THREEFRY_PARTITIONABLE": "false", "PYTHONPATH": str(ROOT)}
  return subprocess.Popen(
      [sys.executable, str(ROOT / "train.py"), *flags], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple:
  """(exit code, stdout, stderr) of a `launch_train_py` process (stderr None when merged
  into stdout); fails the test, with the output's tail, past `timeout` seconds."""
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"train.py timed out after {timeout}s; output:\n{(err or out)[-3000:]}")
  return proc.returncode, out, err
