"""Runs one tiny training in a fresh process (for the SIGTERM and multi-host tests).

Usage: python tests/training_worker.py '<json>' with keys "workdir", "config" (dotted key
-> value changes for `tiny_config`) and optionally "override". Exits with the run's
status code (lipnorm.training.EXIT_CODES). Devices: JAX_NUM_CPU_DEVICES.
"""
import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", int(os.environ.get("JAX_NUM_CPU_DEVICES", "1")))
# As tests/conftest.py and its fast_compiles fixture, so results match the test process's.
jax.config.update("jax_threefry_partitionable", False)
jax.config.update("jax_disable_most_optimizations", True)

from absl import logging  # noqa: E402

from lipnorm.training import EXIT_CODES, train  # noqa: E402
from training_helpers import tiny_config  # noqa: E402

if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  args = json.loads(sys.argv[1])
  summary = train(tiny_config(**args["config"]), args["workdir"],
                  override_config=args.get("override", False), interactive=False)
  print(f"status {summary['status']} step {summary['step']}", flush=True)
  sys.exit(EXIT_CODES[summary["status"]])
