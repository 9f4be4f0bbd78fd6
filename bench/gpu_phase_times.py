"""Times each phase of the accelerator campaign (`bench/gpu_campaign.py`) without a dataset:
the training step (compile, then steady state) and the first and second call of each
probe, for ResNet-18 and EfficientNet-B3 with the campaign's own configs (BN, bfloat16).

  PYTHONPATH=$PWD python bench/gpu_phase_times.py --data_dir /path/with/cifar10-shaped-data
  PYTHONPATH=$PWD python bench/gpu_phase_times.py --tiny       # CPU smoke test (digits)

Use it to size a campaign to its budget: one line of JSON per phase is printed (and
flushed) as soon as it ends, so a run cut short by a time limit still reports every
phase it finished. The step time is what matters, not the data, so random CIFAR-shaped
files (`--data_dir`) do; the probes run on random N(0, 1) inputs. Phases, per model:
  train     `--steps` steps with probes off: seconds to the first logged window (compile),
            then median step time over the later log windows, FLOPs per step, MFU;
  layers    the layer probe with exact conv operator norms (the campaign's step 0);
  lip_x / lip_theta / bound / hessian: the Lipschitz hook's parts one at a time
            (eval-mode BN, the campaign's number of examples).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from bench import gpu_campaign
from lipnorm.experiments import common
from lipnorm.probes.hooks import LayerProbeHook, LipschitzHook, measurement_model
from lipnorm.training import build_model as build_training_model
from lipnorm.training import train


def emit(**fields) -> None:
  print(json.dumps(fields, default=str), flush=True)


def time_training(name: str, cfg, steps: int, workdir: pathlib.Path, peak: float) -> None:
  cfg.probes.enabled = False
  cfg.num_train_steps = steps
  cfg.log_every_steps = max(steps // 8, 1)
  cfg.eval_every_steps = cfg.checkpoint_every_steps = steps
  cfg.schedule.warmup_steps = 0
  t0 = time.time()
  summary = train(cfg, str(workdir), interactive=False)
  wall = time.time() - t0
  rates = gpu_campaign.train_rates(workdir)
  later = rates[1:] if rates.size > 1 else rates       # the first window holds the compile
  step_t = float(np.median(1.0 / later))
  data = common.load_data(cfg, 1)
  fps = gpu_campaign.flops_per_step(cfg, data.num_classes, tuple(data.images.shape[1:]))
  emit(model=name, phase="train", steps=summary["step"], wall_s=wall,
       first_window_s=float(1.0 / rates[0] * cfg.log_every_steps),
       step_time_median_s=step_t, flops_per_step=fps,
       mfu=fps / step_t / peak if np.isfinite(peak) else None)


def time_probes(name: str, cfg, examples: int, hessian_examples: int) -> None:
  model = measurement_model(build_training_model(cfg, 10, pmap=False))
  shape = (cfg.probes.batch_size, *((8, 8, 1) if cfg.data.source == "digits"
                                    else (32, 32, 3)))
  x = jax.random.normal(jax.random.key(0), shape)
  batch = {"image": x, "label": jax.numpy.arange(shape[0]) % 10}
  variables = jax.jit(lambda x: common.init_variables(model, x, seed=0))(x[:1])
  lip = dict(num_classes=10, bn_modes=("eval",), num_examples=examples,
             param=False, bound=False, hessian_examples=0)
  hooks = [("layers", LayerProbeHook(model, 1, bn_modes=cfg.probes.bn_modes)),
           ("lip_x", LipschitzHook(model, 1, **lip)),
           ("lip_theta", LipschitzHook(model, 1, **{**lip, "param": True})),
           ("bound", LipschitzHook(model, 1, **{**lip, "bound": True})),
           ("hessian", LipschitzHook(model, 1, **{**lip,
                                                   "hessian_examples": hessian_examples}))]
  for phase, hook in hooks:
    times = []
    for step in (0, 1):
      t0 = time.time()
      out = hook(step, variables, batch)
      times.append(time.time() - t0)
    scalars = {k: v for k, v in out.items() if isinstance(v, (int, float))}
    emit(model=name, phase=phase, first_call_s=times[0], second_call_s=times[1],
         values=dict(list(scalars.items())[:6]))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default=None)
  p.add_argument("--steps", type=int, default=400, help="training steps per model")
  p.add_argument("--models", default="resnet18,efficientnet_b3")
  p.add_argument("--phases", default="train,probes")
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--peak_tflops", type=float, default=None)
  args = p.parse_args(argv)
  phases, models = args.phases.split(","), args.models.split(",")
  known = [name for name, _ in gpu_campaign.MODELS]
  for given, allowed, flag in ((phases, ["train", "probes"], "--phases"),
                               (models, known, "--models")):
    bad = [v for v in given if v not in allowed]
    if bad:   # before any compile
      p.error(f"{flag}: {', '.join(map(repr, bad))} not allowed; allowed: "
              f"{', '.join(allowed)}")
  kind, peak = gpu_campaign.device_peak(args.peak_tflops)
  emit(device=kind, peak_flops=peak, jax=jax.__version__)
  # Phase-major: every model's step time comes before the (longer) probe timings.
  for phase in phases:
    for name, config_name in gpu_campaign.MODELS:
      if name not in models:
        continue
      c = gpu_campaign.campaign_config(config_name, 1.0, tiny=args.tiny,
                                       data_dir=args.data_dir)
      if phase == "train":
        with tempfile.TemporaryDirectory() as d:
          time_training(name, c, args.steps, pathlib.Path(d), peak)
      else:
        time_probes(name, c, *((2, 8) if args.tiny else
                               (c.probes.lipschitz_examples, c.probes.hessian_examples)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
