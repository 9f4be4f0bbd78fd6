"""Cost of the Lipschitz engine, as multiples of one forward+backward pass.

Usage (from the repo root):
  python bench/lipschitz_cost.py                 # full: relu_net-10 (width 512) and
                                                 # ResNet-18 (width 64), batch 128
  python bench/lipschitz_cost.py --small         # CPU-sized: batch 16, ResNet-18 width 8
  python bench/lipschitz_cost.py --models relu_net --depths 5,10,20,40

For each model on CIFAR-shaped input `[B, 32, 32, 3]` (10 classes) it prints:
  * the time of one forward+backward pass of the batch (grad of cross-entropy w.r.t.
    the parameters), the reference unit;
  * the time of exact per-example input Lipschitz constants for the batch with each
    method (jacrev, jacfwd, power, lanczos; iterative ones to tol 1e-6) and its ratio to
    the unit (jacfwd needs 3072 JVPs per example: it is timed on `--jacfwd_examples`
    examples and scaled to the batch, and says so);
  * the Gram-matrix products (each one JVP + one VJP) power iteration and Lanczos need
    to be within 1e-3 relative of the exact value for every example, and their time;
  * the time of the full `upper_bound` report (first call includes compiles);
  * relu_net input-Lipschitz cost vs depth.
Timings exclude compilation (one warm-up call) unless stated.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lipnorm.lipschitz import input_lipschitz, upper_bound
from lipnorm.models import get_model

SHAPE = (32, 32, 3)
ITERS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def timed(fn, repeats: int) -> float:
  """Median wall time of `fn()` (blocking on its result) after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def fwd_bwd_time(model, variables, xs, labels, repeats: int) -> float:
  @jax.jit
  def step(params, xs):
    def loss(p):
      logits = model.apply({**variables, "params": p}, xs)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(xs.shape[0]), labels])
    return jax.value_and_grad(loss)(params)
  return timed(lambda: step(variables["params"], xs), repeats)


def lip(model, variables, xs, bn_mode, **kw):
  return input_lipschitz(model, variables, xs, bn_mode=bn_mode, **kw).value


def bench_model(name, model, variables, xs, bn_mode, args) -> None:
  labels = jnp.arange(xs.shape[0]) % 10
  unit = fwd_bwd_time(model, variables, xs, labels, args.repeats)
  n_params = sum(p.size for p in jax.tree.leaves(variables["params"]))
  print(f"\n== {name}: {n_params:,} params, input {tuple(xs.shape)}, bn_mode={bn_mode}")
  print(f"forward+backward (the unit): {unit * 1e3:.1f} ms")
  exact = np.asarray(lip(model, variables, xs, bn_mode, method="jacrev"))
  for method in args.methods:
    if method == "jacfwd":
      k = min(args.jacfwd_examples, xs.shape[0])
      t = timed(lambda: lip(model, variables, xs[:k], bn_mode, method="jacfwd"),
                args.repeats) * xs.shape[0] / k
      note = f" (timed on {k} examples, scaled to {xs.shape[0]})"
    else:
      kw = {} if method == "jacrev" else {"tol": 1e-6, "num_iters": 256}
      t = timed(lambda: lip(model, variables, xs, bn_mode, method=method, **kw), args.repeats)
      note = "" if method == "jacrev" else " (to tol 1e-6)"
    print(f"input Lipschitz, method={method:8s}: {t * 1e3:10.1f} ms = {t / unit:8.1f} x "
          f"fwd+bwd{note}")
  for method in ("power", "lanczos"):
    if method not in args.methods:
      continue
    for iters in ITERS:
      res = input_lipschitz(model, variables, xs, bn_mode=bn_mode, method=method, tol=0.0,
                            num_iters=iters)
      err = float(np.max(np.abs(np.asarray(res.value) / exact - 1)))
      if err <= 1e-3:
        t = timed(lambda: lip(model, variables, xs, bn_mode, method=method, tol=0.0,
                              num_iters=iters), args.repeats)
        print(f"{method:8s} within 1e-3 of exact after {int(np.max(res.iterations))} Gram "
              f"products (max rel. error {err:.1e}): {t * 1e3:.1f} ms = {t / unit:.1f} x "
              "fwd+bwd")
        break
    else:
      print(f"{method:8s} not within 1e-3 after {ITERS[-1]} Gram products (error {err:.1e})")
  if not args.skip_bound:
    start = time.perf_counter()
    rep = upper_bound(model, variables, input_shape=xs.shape[1:], bn_mode="eval")
    cold = time.perf_counter() - start
    start = time.perf_counter()
    upper_bound(model, variables, input_shape=xs.shape[1:], bn_mode="eval")
    warm = time.perf_counter() - start
    print(f"upper_bound report: {cold:.2f} s first call, {warm:.2f} s again "
          f"(normalized bound {rep.normalized_bound:.4g}, product {rep.product_bound:.4g}, "
          f"largest local {float(exact.max()):.4g})")


def bench_depth(args, key) -> None:
  print(f"\n== relu_net (width {args.relu_width}) cost vs depth, batch {args.batch}")
  print(f"{'depth':>5s} {'fwd+bwd ms':>11s} {'jacrev ms':>10s} {'ratio':>7s} "
        f"{'bound s':>8s} {'local max':>10s} {'bound':>10s}")
  xs = jax.random.normal(key, (args.batch, *SHAPE))
  labels = jnp.arange(args.batch) % 10
  for depth in args.depths:
    model = get_model("relu_net", depth=depth, width=args.relu_width, num_classes=10)
    v = model.init(jax.random.key(depth), xs[:1])
    unit = fwd_bwd_time(model, v, xs, labels, args.repeats)
    t = timed(lambda: lip(model, v, xs, None), args.repeats)
    start = time.perf_counter()
    rep = upper_bound(model, v, input_shape=SHAPE)
    tb = time.perf_counter() - start
    local = float(jnp.max(lip(model, v, xs, None)))
    print(f"{depth:5d} {unit * 1e3:11.1f} {t * 1e3:10.1f} {t / unit:7.1f} {tb:8.2f} "
          f"{local:10.4g} {rep.normalized_bound:10.4g}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="CPU-sized run: batch 16, ResNet-18 width 8, relu width 128")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--models", default="relu_net,resnet18")
  parser.add_argument("--methods", default="jacrev,jacfwd,power,lanczos")
  parser.add_argument("--relu_width", type=int, default=None)
  parser.add_argument("--resnet_width", type=int, default=None)
  parser.add_argument("--jacfwd_examples", type=int, default=2)
  parser.add_argument("--depths", default="5,10,20,40")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_bound", action="store_true")
  args = parser.parse_args()
  args.batch = args.batch or (16 if args.small else 128)
  args.relu_width = args.relu_width or (128 if args.small else 512)
  args.resnet_width = args.resnet_width or (8 if args.small else 64)
  args.methods = [m for m in args.methods.split(",") if m]
  args.depths = [int(d) for d in args.depths.split(",") if d]
  print(f"devices: {jax.devices()}; batch {args.batch}; input {SHAPE}; methods "
        f"{args.methods}; relu width {args.relu_width}; resnet18 width {args.resnet_width}")
  key = jax.random.key(0)
  xs = jax.random.normal(key, (args.batch, *SHAPE))
  for name in args.models.split(","):
    if name == "relu_net":
      model = get_model("relu_net", depth=10, width=args.relu_width, num_classes=10)
      bn_mode = None
    elif name == "resnet18":
      model = get_model("resnet18", width=args.resnet_width, num_classes=10, norm="batch")
      bn_mode = "eval"
    else:
      raise ValueError(f"--models entry {name!r}; allowed: relu_net, resnet18")
    variables = model.init(jax.random.key(1), xs[:1])
    label = f"{name} (depth 10, width {args.relu_width})" if name == "relu_net" else \
        f"{name} (width {args.resnet_width}, BN)"
    bench_model(label, model, variables, xs, bn_mode, args)
  if args.depths:
    bench_depth(args, key)


if __name__ == "__main__":
  main()
