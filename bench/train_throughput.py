"""Training-step throughput: examples/s, step time, and achieved FLOP/s as a fraction of
the machine's measured matmul peak, for relu_net-10 and ResNet-18 on CIFAR-shaped batches.

  python bench/train_throughput.py                       # defaults below
  python bench/train_throughput.py --models=relu_net --devices=1 --batch=256 --steps=50
  python bench/train_throughput.py --models=relu_net --devices=1 --norm=none --steps=100 \
      --data_dir=/path/to/cifar10        # + where train.py's time goes (see --data_dir)

Uses lipnorm.training's own pmapped train step (SGD + momentum, BN where the model has
it) on synthetic data. Without an accelerator, 4 CPU devices are simulated
(JAX_NUM_CPU_DEVICES=4); they share the host's cores, so "4 devices" there measures
pmap overhead, not a speed-up, and the peak is the host's (one matmul uses every core).
FLOPs per step come from XLA's cost analysis of the compiled step (per device, times the
devices); a dense `n x n` matmul timed in the same dtype gives the peak (per device,
times the devices used on accelerators).
"""
import os
import time

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")  # only affects the CPU platform

from absl import app, flags  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["relu_net", "resnet18"], "Models to time.")
_DEVICES = flags.DEFINE_list("devices", ["1", "4"], "Local device counts to time.")
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch size.")
_IMAGE = flags.DEFINE_list("image", ["32", "32", "3"], "Image shape H,W,C.")
_DEPTH = flags.DEFINE_integer("depth", 10, "relu_net depth (linear maps).")
_WIDTH = flags.DEFINE_integer("width", 512, "relu_net width.")
_NORM = flags.DEFINE_string("norm", "batch", "Normalizer for every model.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed steps per setting (0: 20 on "
                              "accelerators, 3 on CPU, where a ResNet-18 step takes seconds).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the compiling one.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder holding cifar-10-binary.tar.gz: also time, per model, the "
    "CIFAR-10 training iterator alone (crop+flip, standardize), its host->device copy, "
    "and the step fed by both as train.py feeds it (one device).")
_CONV_IMPL = flags.DEFINE_string("conv_impl", "auto", "conv_impl of the conv models.")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 0, "Matmul size for the peak (0: 2048 on "
                                 "CPU, 8192 on accelerators).")


def matmul_peak(n: int, dtype) -> float:
  """FLOP/s of one jitted `n x n @ n x n` on the default device (best of 5)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def step_flops(p_train, state, batch) -> float:
  """FLOPs of one compiled train step on ONE device (XLA's cost analysis of the SPMD
  program, which is per device), or nan if unavailable."""
  try:
    cost = p_train.lower(state, batch).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get("flops", float("nan")))
  except Exception as e:  # cost analysis is best-effort on some backends
    print(f"  (no cost analysis: {type(e).__name__}: {e})")
    return float("nan")


def time_setting(model_name: str, k: int, steps: int):
  import jax
  import numpy as np
  from lipnorm.training import base_config, build_model, create_train_state, make_optimizer
  from lipnorm.training.distributed import replicate
  from lipnorm.training.steps import make_steps

  config = base_config()
  config.model.name, config.model.norm = model_name, _NORM.value
  if model_name == "relu_net":
    config.model.depth, config.model.width = _DEPTH.value, _WIDTH.value
  elif model_name != "relu_net" and model_name != "mlp":
    config.model.conv_impl = _CONV_IMPL.value
  config.dtype = _DTYPE.value
  config.schedule.name = "constant"
  devices = jax.local_devices()[:k]
  shape = tuple(int(s) for s in _IMAGE.value)
  model = build_model(config, 10)
  tx = make_optimizer(config, 1000)
  state = replicate(jax.device_get(create_train_state(model, tx, shape, 0)), devices)
  p_train, _ = make_steps(config, model, tx, 10, devices=devices)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(k, _BATCH.value // k, *shape)).astype(np.float32),
           "label": rng.integers(0, 10, size=(k, _BATCH.value // k)).astype(np.int32)}
  flops = step_flops(p_train, state, batch) * k   # all k devices
  t = time.perf_counter()
  state, m = p_train(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  for _ in range(_WARMUP.value):
    state, m = p_train(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = p_train(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t) / steps
  if _DATA_DIR.value and k == 1:
    fed_breakdown(config, p_train, state, steps)
  return step_s, compile_s, flops


def fed_breakdown(config, p_train, state, steps: int) -> None:
  """Prints ms per batch of: the CIFAR-10 iterator alone (synchronous), its host->device
  copy, the step alone on one device batch, and the step fed as train.py's loop feeds it
  (next batch copied while the step runs) by the prefetching (thread) and by the
  synchronous iterator. The step-alone and fed timings alternate, so the machine's
  load drifts through all of them alike."""
  import jax
  from lipnorm.data import get_dataset
  from lipnorm.training import distributed
  config.data.source, config.data.data_dir = "cifar10", _DATA_DIR.value
  config.data.batch_size = _BATCH.value
  devices = jax.local_devices()[:1]
  ds = get_dataset(config.data, seed=0, num_local_devices=1)
  n = max(steps, 20)
  with ds.train_iterator(prefetch=0) as it:
    next(it)
    t = time.perf_counter()
    host = [next(it) for _ in range(n)]
    pipe_ms = (time.perf_counter() - t) / n * 1e3
  t = time.perf_counter()
  for b in host:
    jax.block_until_ready(distributed.shard_batch(b, devices))
  copy_ms = (time.perf_counter() - t) / n * 1e3
  fixed = distributed.shard_batch(host[0], devices)
  ms = {"alone": [], "prefetch 2": [], "prefetch 0": []}
  for _ in range(2):
    for mode in ms:
      it = None if mode == "alone" else ds.train_iterator(prefetch=int(mode[-1]))
      nxt = fixed if it is None else distributed.shard_batch(next(it), devices)
      t = time.perf_counter()
      for _ in range(n):
        state, m = p_train(state, nxt)
        if it is not None:
          nxt = distributed.shard_batch(next(it), devices)
      jax.block_until_ready(m)
      ms[mode].append((time.perf_counter() - t) / n * 1e3)
      if it is not None:
        it.close()
  alone, pre, sync = (min(v) for v in ms.values())
  print(f"  data (cifar10, batch {_BATCH.value}, augment {ds.augment}): iterator alone "
        f"{pipe_ms:.2f} ms/batch, host->device copy {copy_ms:.2f} ms; step alone "
        f"{alone:.2f} ms, fed by the prefetching iterator {pre:.2f} ms, by the "
        f"synchronous one {sync:.2f} ms (best of 2 alternating runs of {n} steps)")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from lipnorm.models import model_names

  backend = jax.default_backend()
  simulated = backend == "cpu"
  dev = jax.local_devices()[0]
  print(f"backend {backend}: {jax.local_device_count()} local device(s) "
        f"({dev.device_kind}){' simulated on the host CPU cores' if simulated else ''}; "
        f"{os.cpu_count()} host cores; dtype {_DTYPE.value}, global batch {_BATCH.value}, "
        f"image {tuple(int(s) for s in _IMAGE.value)}")
  n = _MATMUL_N.value or (2048 if simulated else 8192)
  steps = _STEPS.value or (3 if simulated else 20)
  peak = matmul_peak(n, jnp.dtype(_DTYPE.value))
  print(f"matmul peak ({n}x{n} {_DTYPE.value}, one device): {peak / 1e12:.3f} TFLOP/s; "
        f"{steps} timed steps per row; '1st call' = compilation + one step")
  print(f"{'model':<12}{'devices':>8}{'step ms':>10}{'examples/s':>12}{'GFLOP/step':>12}"
        f"{'TFLOP/s':>10}{'of peak':>9}{'1st call s':>11}")
  for name in _MODELS.value:
    if name not in model_names():
      print(f"{name:<12} skipped: not a registered model (have {', '.join(model_names())})")
      continue
    for k in (int(d) for d in _DEVICES.value):
      if k > jax.local_device_count():
        print(f"{name:<12}{k:>8}  skipped: only {jax.local_device_count()} local device(s)")
        continue
      if _BATCH.value % k:
        print(f"{name:<12}{k:>8}  skipped: batch {_BATCH.value} does not split over {k}")
        continue
      step_s, compile_s, flops = time_setting(name, k, steps)
      achieved = flops / step_s
      machine_peak = peak if simulated else peak * k
      print(f"{name:<12}{k:>8}{step_s * 1e3:>10.2f}{_BATCH.value / step_s:>12.0f}"
            f"{flops / 1e9:>12.3f}{achieved / 1e12:>10.4f}{achieved / machine_peak:>9.1%}"
            f"{compile_s:>11.1f}")


if __name__ == "__main__":
  app.run(main)
