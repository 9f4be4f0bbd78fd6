"""Optimizer and learning-rate schedule registries (one each), built from a config.

`make_schedule(config, total_steps)` -> `optax.Schedule` (step -> learning rate);
`make_optimizer(config, total_steps)` -> `optax.GradientTransformation`, which chains
optional gradient clipping (by global norm), coupled L2 weight decay for sgd/adam (the
classic `g + wd * w`), and the optimizer itself (adamw decays weights decoupled).
"""
from __future__ import annotations

from typing import Callable, Optional

import optax

from lipnorm.registry import Registry
from lipnorm.training.config_schema import ConfigError

ScheduleFactory = Callable[..., optax.Schedule]
OptimizerFactory = Callable[..., optax.GradientTransformation]

SCHEDULES: Registry[ScheduleFactory] = Registry("learning-rate schedule")
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


def schedule_names() -> list[str]:
  return SCHEDULES.names()


def optimizer_names() -> list[str]:
  return OPTIMIZERS.names()


@SCHEDULES.register("constant")
def _constant(cfg, lr: float, steps: int) -> optax.Schedule:
  del cfg, steps
  return optax.constant_schedule(lr)


@SCHEDULES.register("cosine")
def _cosine(cfg, lr: float, steps: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=cfg.final_lr_fraction)


@SCHEDULES.register("step")
def _step(cfg, lr: float, steps: int) -> optax.Schedule:
  boundaries = {int(round(b * steps)): cfg.step_factor for b in cfg.step_boundaries}
  return optax.piecewise_constant_schedule(lr, boundaries)


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """The learning rate at each optimizer step: `schedule.warmup_steps` of linear warmup
  from 0, then `schedule.name` over the remaining steps."""
  lr = float(config.optimizer.learning_rate)
  warmup = int(config.schedule.warmup_steps)
  if warmup and warmup >= total_steps:
    # validate_config checks this for num_train_steps; with num_epochs the step count
    # is known only once the dataset's size is (here, still before any training).
    raise ConfigError(f"config.schedule.warmup_steps={warmup} is not allowed; allowed: "
                      f"fewer than the run's {total_steps} training steps")
  main = SCHEDULES.get(config.schedule.name)(config.schedule, lr, total_steps - warmup)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


@OPTIMIZERS.register("sgd")
def _sgd(cfg, lr: optax.Schedule) -> optax.GradientTransformation:
  return optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)


@OPTIMIZERS.register("adam")
def _adam(cfg, lr: optax.Schedule) -> optax.GradientTransformation:
  return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


@OPTIMIZERS.register("adamw")
def _adamw(cfg, lr: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def make_optimizer(config, total_steps: int, schedule: Optional[optax.Schedule] = None
                   ) -> optax.GradientTransformation:
  """The optimizer of `config` following `schedule` (default: `make_schedule(config,
  total_steps)`; the training loop passes the one it also logs learning rates from)."""
  cfg = config.optimizer
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.weight_decay > 0 and cfg.name != "adamw":
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  schedule = make_schedule(config, total_steps) if schedule is None else schedule
  parts.append(OPTIMIZERS.get(cfg.name)(cfg, schedule))
  return optax.chain(*parts)
