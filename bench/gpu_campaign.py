"""The prepared accelerator campaign: ResNet-18 (BN) then EfficientNet-B3 (BN) on CIFAR-10
in bfloat16 with the layer probes on (Figures 1-3; the Lipschitz probes with
`--lipschitz`, measured in float32), inside one wall-clock budget (default 9 minutes).
Size it first with `bench/gpu_phase_times.py` (one H200: ResNet-18 5.2 ms per step,
EfficientNet-B3 22 ms plus about 3 minutes of compiling; results/gpu_campaign/).

  PYTHONPATH=$PWD python bench/gpu_campaign.py --data_dir /path/with/cifar10 \
      --out runs/gpu_campaign                     # ~9 minutes on one GPU
  python bench/gpu_campaign.py --tiny --out /tmp/gpu_campaign_tiny
                                                  # CPU smoke test: digits, tiny widths

ResNet-18 trains until `--resnet_share` of the budget has passed, EfficientNet-B3 until
`--reserve_s` before its end (the rest writes figures): each run is stopped by a timer
that sends this process SIGTERM, which the training loop turns into "checkpoint and
stop at the next step" (status "preempted"); a run whose schedule ends first simply
completes. The cosine schedule spans `--resnet_epochs` / `--effnet_epochs` (set them to
what the budget allows on the machine at hand; the run stops at the budget either way).

Writes, under --out: <model>/run (the training workdir), <model>/dynamics (the seed's
Figures 1-3: per-layer weight norms and input variances over training and their
cumulative products, via `python -m lipnorm.experiments dynamics`), campaign.json and
campaign.md with steps, epochs, status, test accuracy, step time and MFU.

Step time: the median over the training log windows of 1/steps_per_sec (windows with
probes or evaluation are slower; the mean over the run is also given). MFU: model FLOPs
per step (3 x the forward pass's XLA cost analysis at the training batch: forward plus
backward) x steps per second / the device's dense peak (`PEAK_TFLOPS` by device kind,
or --peak_tflops); n/a where no peak is known (e.g. CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import signal
import sys
import threading
import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lipnorm.experiments import common, presets  # noqa: E402
from lipnorm.experiments.dynamics import default_config as dynamics_config  # noqa: E402
from lipnorm.experiments.dynamics import run_dynamics  # noqa: E402
from lipnorm.experiments.records import read_records, series  # noqa: E402
from lipnorm.experiments.report import fmt, markdown_table  # noqa: E402
from lipnorm.training import build_model as build_training_model  # noqa: E402
from lipnorm.training import train  # noqa: E402

# Dense bf16 peak FLOP/s per chip (vendor spec sheets, without sparsity), by a substring
# of jax's device_kind.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v6": 918.0}

CIFAR10_TRAIN = 50000   # training images: the campaign's step count per epoch
MODELS = (("resnet18", "resnet18_cifar10"), ("efficientnet_b3", "efficientnet_b3_cifar10"))


def campaign_config(config_name: str, epochs: float, *, tiny: bool,
                    data_dir: str | None, lipschitz: bool = False
                    ) -> "ml_collections.ConfigDict":  # noqa: F821
  """The training config of one campaign run: `presets.gpu` (probes on) in bfloat16 with
  evaluation about once an epoch, the Lipschitz probes only if `lipschitz`; `tiny`:
  digits, narrow nets, a few steps."""
  c = presets.gpu(config_name, epochs, "batch")
  c.dtype = "bfloat16"
  c.probes.lipschitz = lipschitz
  if tiny:
    c.data.source = "digits"
    c.data.batch_size, c.data.eval_batch_size = 32, 64
    c.data.augment = False
    # Shallow as well as narrow: one block per stage (the full architectures' training
    # is covered by the configs' own tests; compiling them here cost minutes of CPU).
    with c.model.unlocked(), c.model.ignore_type():
      if c.model.name == "resnet18":
        c.model.width, c.model.stage_sizes = 4, (1, 1, 1, 1)
      else:
        c.model.width_coefficient, c.model.depth_coefficient = 0.1, 0.3
        c.model.top_filters = 32
        c.model.blocks = ((1, 3, 1, 1, 32, 16), (6, 3, 2, 1, 16, 24), (6, 5, 2, 1, 24, 40))
    c.schedule.warmup_steps = 0
    c.num_train_steps = int(epochs)          # tiny: "epochs" counts steps
    c.log_every_steps, c.eval_every_steps = 2, int(epochs)
    c.checkpoint_every_steps = int(epochs)
    # layer statistics with Frobenius weight norms only: exact conv operator norms and
    # the Lipschitz hook cost minutes of CPU compiles (tests/test_probe_hooks.py covers
    # the hooks, bfloat16 models included)
    c.probes.every_steps, c.probes.spectral_every_steps = 2, 0
    c.probes.lipschitz = False
    c.probes.bn_modes = ("eval",)
    c.probes.batch_size = 32
  else:
    if data_dir:
      c.data.data_dir = data_dir
    c.eval_every_steps = 390                 # about one CIFAR-10 epoch at batch 128
    # The configs' warmups are sized for 200 epochs (EfficientNet-B3: 5 of them); a
    # campaign of a few epochs warms up for at most a tenth of its schedule.
    steps = int(epochs * CIFAR10_TRAIN // c.data.batch_size)
    c.schedule.warmup_steps = min(c.schedule.warmup_steps, steps // 10)
    c.log_every_steps = 50
  return c


@contextlib.contextmanager
def stop_after(seconds: float):
  """Sends this process SIGTERM after `seconds` (the training loop checkpoints and stops
  at the next step). Outside the loop's own handler, the timer's SIGTERM is ignored (one
  firing just after training ends must not kill the campaign) while any other SIGTERM
  still ends the process."""
  fired = threading.Event()

  def on_sigterm(signum, frame):
    if not fired.is_set():
      raise SystemExit(128 + signum)

  def fire():
    fired.set()
    os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  timer = threading.Timer(max(seconds, 0.0), fire)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()
    signal.signal(signal.SIGTERM, previous)


def _flops(cost) -> float | None:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return (cost or {}).get("flops")


def flops_per_step(config, num_classes: int, image_shape: tuple) -> float:
  """3 x the XLA-counted FLOPs of one forward pass on a training batch (forward +
  backward ~ 3 forwards); NaN if the backend gives no cost analysis."""
  model = build_training_model(config, num_classes, pmap=False)
  x = jax.ShapeDtypeStruct((config.data.batch_size, *image_shape), jnp.float32)
  # Shapes only: nothing is initialized (an eager init of EfficientNet-B3 alone compiles
  # hundreds of ops), and XLA counts the FLOPs of the lowered program where it can.
  variables = jax.eval_shape(lambda x: common.init_variables(model, x, seed=0), x)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
  flops = _flops(lowered.cost_analysis())
  if not flops:
    # The GPU backend of jax 0.11 gave no FLOPs for the lowered program (seen on an
    # H200): count them on the compiled one instead (one extra compile).
    flops = _flops(lowered.compile().cost_analysis())
  return 3.0 * float(flops) if flops else float("nan")


def device_peak(peak_tflops: float | None) -> tuple[str, float]:
  kind = jax.devices()[0].device_kind
  if peak_tflops:
    return kind, peak_tflops * 1e12
  for key, tf in PEAK_TFLOPS.items():
    if key.lower() in kind.lower():
      return kind, tf * 1e12
  return kind, float("nan")


def train_rates(workdir: pathlib.Path) -> np.ndarray:
  """steps/s of each training log window of the run in `workdir`, in order (finite and
  positive ones; empty when there are none)."""
  try:
    _, rates = series(read_records(workdir), "train", "steps_per_sec")
  except ValueError:
    return np.zeros(0)
  return rates[np.isfinite(rates) & (rates > 0)]


def run_model(name: str, config, workdir: pathlib.Path, seconds: float) -> dict:
  t0 = time.time()
  with stop_after(seconds):
    summary = train(config, str(workdir), interactive=False)
  wall = time.time() - t0
  rates = train_rates(workdir)
  return {"model": name, "status": summary.get("status"), "steps": summary.get("step"),
          "wall_s": wall, "final": summary.get("final"),
          "steps_per_sec_mean": summary.get("steps_per_sec"),
          "step_time_median_s": float(np.median(1.0 / rates)) if rates.size else None,
          "workdir": str(workdir)}


def write_summary(out: pathlib.Path, kind: str, peak: float, args, wall: float,
                  results: list) -> None:
  """campaign.json / campaign.md of the runs done so far (rewritten after each model, so
  a campaign cut short by an outer time limit keeps what it finished)."""
  summary = {"device": kind, "peak_flops": peak, "budget_s": args.budget_s,
             "wall_s": wall, "tiny": args.tiny, "lipschitz": args.lipschitz,
             "runs": results}
  (out / "campaign.json").write_text(json.dumps(summary, indent=1, default=str))
  rows = [[r["model"], r["status"], r["steps"], r["epochs"],
           (r["final"] or {}).get("eval_accuracy"), r["step_time_median_s"],
           r["steps_per_sec_mean"], r["flops_per_step"], r["mfu"], r["wall_s"]]
          for r in results]
  (out / "campaign.md").write_text(
      f"# Accelerator campaign on {kind} ({fmt(wall)} s of a "
      f"{fmt(args.budget_s)} s budget)\n\n"
      + markdown_table(["model", "status", "steps", "epochs", "test acc",
                        "step time (median, s)", "steps/s (mean)", "FLOPs/step", "MFU",
                        "wall (s)"], rows)
      + "\nFigures 1-3 of each model: `<model>/dynamics/fig{1,2,3}_*.png`.\n")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/gpu_campaign")
  p.add_argument("--data_dir", default=None, help="folder with cifar10/ (else "
                 "$LIPNORM_DATA_DIR / the data pipeline's default)")
  p.add_argument("--budget_s", type=float, default=540.0, help="the whole campaign")
  p.add_argument("--resnet_share", type=float, default=0.5,
                 help="fraction of the budget for ResNet-18")
  p.add_argument("--reserve_s", type=float, default=60.0,
                 help="kept at the end for the figures")
  p.add_argument("--resnet_epochs", type=float, default=15.0, help="schedule length")
  p.add_argument("--effnet_epochs", type=float, default=8.0, help="schedule length")
  p.add_argument("--peak_tflops", type=float, default=None, help="device peak override")
  p.add_argument("--lipschitz", action="store_true",
                 help="Lipschitz probes too (every 2000 steps, from step 0): off by "
                 "default, since at full size they did not finish within minutes on an "
                 "H200 (the layer probes, which Figures 1-3 need, always run)")
  p.add_argument("--tiny", action="store_true", help="CPU smoke test: digits, tiny nets, "
                 "--resnet_epochs / --effnet_epochs count steps")
  args = p.parse_args(argv)
  if not 0 < args.resnet_share < 1 or args.budget_s <= args.reserve_s:
    p.error(f"--resnet_share={args.resnet_share} must be in (0, 1) and --budget_s="
            f"{args.budget_s} above --reserve_s={args.reserve_s}")
  start = time.time()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  kind, peak = device_peak(args.peak_tflops)
  deadlines = (start + args.resnet_share * args.budget_s,
               start + args.budget_s - args.reserve_s)
  results = []
  for (name, config_name), deadline, epochs in zip(
      MODELS, deadlines, (args.resnet_epochs, args.effnet_epochs)):
    cfg = campaign_config(config_name, epochs, tiny=args.tiny, data_dir=args.data_dir,
                          lipschitz=args.lipschitz)
    data = common.load_data(cfg, 1)
    fps = flops_per_step(cfg, data.num_classes, tuple(data.images.shape[1:]))
    r = run_model(name, cfg, out / name / "run", deadline - time.time())
    steps_per_epoch = data.ds.info.num_train // cfg.data.batch_size
    r["epochs"] = (r["steps"] or 0) / max(steps_per_epoch, 1)
    r["flops_per_step"] = fps
    step_t = r["step_time_median_s"]
    r["mfu"] = fps / step_t / peak if step_t and np.isfinite(peak) else None
    dcfg = dynamics_config()
    dcfg.workdir, dcfg.out_dir = r["workdir"], str(out / name / "dynamics")
    dcfg.title = f"{name} BN bf16"
    r["dynamics"] = run_dynamics(dcfg)
    r["dynamics"].pop("curves", None)
    results.append(r)
    write_summary(out, kind, peak, args, time.time() - start, results)
  print((out / "campaign.md").read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
