"""Test setup: 4 simulated CPU devices so every pmap path runs on more than one device."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU flags for the tests (a flag already in $XLA_FLAGS wins):
# * the newer fusion emitters compile tiny programs ~1.5x slower than the classic
#   elemental ones (measured on this suite's modules); tests compile hundreds of them;
# * single-threaded Eigen: two xdist workers on 2 cores already fill the machine, and each
#   worker's multi-threaded matmuls/convs made their threads fight (the whole suite: 627
#   -> 563 CPU-s, system time 77 -> 51 s, wall 383 -> 324 s, measured one after another).
_TEST_XLA_FLAGS = {"xla_cpu_use_fusion_emitters": "false",
                   "xla_cpu_multi_thread_eigen": "false"}
for _name, _value in _TEST_XLA_FLAGS.items():
  if _name not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --{_name}={_value}").strip()

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
# same small models): an XLA compilation cache shared by this session -- the controller,
# every xdist worker (they inherit the variable below) and the train.py processes they
# start -- compiles each once. A fresh directory per session, removed at its end by the
# process that made it, so no run reads another's executables.
_OWNS_CACHE = "LIPNORM_TESTS_XLA_CACHE" not in os.environ
if _OWNS_CACHE:
  os.environ["LIPNORM_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="lipnorm-tests-xla-cache-")
_COMPILE_CACHE = os.environ["LIPNORM_TESTS_XLA_CACHE"]
# Only programs that took >= 50 ms to compile are written: the suite compiles ~3000 tiny
# eager ops (~20 ms each), and writing each costs ~5% more than recompiling it elsewhere.
_MIN_COMPILE_S = "0.05"
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILE_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = _MIN_COMPILE_S
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(_MIN_COMPILE_S))
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Modules by their measured share of the suite, heaviest first (worker-seconds from
# `--durations=0`, 2 workers on 2 loaded cores, December 2026). pyproject's addopts pass
# `--dist loadscope --no-loadscope-reorder`: each module runs whole on one worker, and
# modules are handed out in collection order, so sorting them by cost here schedules
# longest-first and the cheap modules fill the gaps at the end. Modules not listed go
# last, in file order: a new heavy module belongs in this list.
_MODULES_BY_COST = (
    "test_models.py",                      # 136 s
    "test_lipschitz_bounds.py",            # 97
    "test_lipschitz_local.py",             # 83
    "test_experiments_e2e.py",             # 81
    "test_experiment_gpu_campaign.py",     # 65
    "test_bound_soundness.py",             # 62
    "test_conv_impl.py",                   # 61
    "test_training_configs.py",            # 59
    "test_training_processes.py",          # 59
    "test_lipschitz_operator_norms.py",    # 55
    "test_training_cli.py",                # 52
    "test_experiment_seeds.py",            # 51
    "test_checkpoint_integrity.py",        # 45
    "test_experiment_correlate.py",        # 36
    "test_lipschitz_spectral.py",          # 36
    "test_lipschitz_search_hessian.py",    # 36
    "test_training_loop.py",               # 29
    "test_probe_hooks.py",                 # 27
    "test_normalizers.py",                 # 20
    "test_probes.py",                      # 19
    "test_data_download.py",               # 17
    "test_training_steps.py",              # 15
    "test_experiment_reports.py",          # 12
    "test_data_real.py",                   # 9
)


def pytest_collection_modifyitems(config, items):
  missing = [n for n in _MODULES_BY_COST if not (pathlib.Path(__file__).parent / n).exists()]
  if missing:   # a renamed module would silently lose its place in the schedule
    raise pytest.UsageError(f"tests/conftest.py _MODULES_BY_COST names missing modules "
                            f"{missing}; list the current file names")
  rank = {name: i for i, name in enumerate(_MODULES_BY_COST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order within


def pytest_sessionfinish(session, exitstatus):
  if _OWNS_CACHE:
    shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """Path to ../shared/data (real CIFAR-10, MNIST, Fashion-MNIST); skips when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real datasets not present at {SHARED_DATA} (see README.md, Data)")
  return SHARED_DATA
