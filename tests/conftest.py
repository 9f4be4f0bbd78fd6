"""Test setup: 4 simulated CPU devices so every pmap path runs on more than one device."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU's newer fusion emitters compile tiny programs ~1.5x slower than the classic
# elemental ones (measured on this suite's modules); tests compile hundreds of them.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_use_fusion_emitters=false").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
# The partitionable threefry (the default since jax 0.5) costs 2-4 s of XLA compile per
# new random shape on CPU; the classic one compiles ~10x faster. Tests draw different
# (equally valid) random numbers; library code is unaffected.
jax.config.update("jax_threefry_partitionable", False)
# Tests compile hundreds of small programs and run each a few times, so XLA's
# optimization passes cost far more than they save: skip them (results equal up to float
# rounding; every tolerance allows for that). Run with JAX_DISABLE_MOST_OPTIMIZATIONS=false
# to test the optimized programs users get.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true"))

import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# Many tests compile the same programs (the tiny training config's steps, probes, the
# same small models): an XLA compilation cache shared by this session and the train.py
# processes it starts compiles each once. A fresh directory per session, removed at its
# end, so no run reads another's executables.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="lipnorm-tests-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILE_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """Path to ../shared/data (real CIFAR-10, MNIST, Fashion-MNIST); skips when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real datasets not present at {SHARED_DATA} (see README.md, Data)")
  return SHARED_DATA
