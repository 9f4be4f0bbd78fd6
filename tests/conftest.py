"""Test setup: 4 simulated CPU devices so every pmap path runs on more than one device."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
# The partitionable threefry (the default since jax 0.5) costs 2-4 s of XLA compile per
# new random shape on CPU; the classic one compiles ~10x faster. Tests draw different
# (equally valid) random numbers; library code is unaffected.
jax.config.update("jax_threefry_partitionable", False)

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """Path to ../shared/data (real CIFAR-10, MNIST, Fashion-MNIST); skips when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real datasets not present at {SHARED_DATA} (see README.md, Data)")
  return SHARED_DATA


@pytest.fixture(scope="module")
def fast_compiles():
  """For modules that compile many graphs and run each a few times: skip XLA's
  expensive optimization passes (results equal up to float rounding). Use with
  `pytestmark = pytest.mark.usefixtures("fast_compiles")`."""
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
