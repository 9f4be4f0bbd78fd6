"""Shared steps of the experiments: data, models, training runs, measurements."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from lipnorm import lipschitz
from lipnorm.data import get_dataset
from lipnorm.models import get_model
from lipnorm.probes.hooks import measurement_model
from lipnorm.probes.lipschitz_metrics import lipschitz_metrics
from lipnorm.training import base_config, build_model as build_training_model
from lipnorm.training import load_checkpoint, train


def train_config() -> ml_collections.ConfigDict:
  """The training config experiments start from: `lipnorm.training.base_config()` with
  probes on (every 50 steps, Lipschitz every 500) and the bundled digits data."""
  c = base_config()
  c.probes.enabled = True
  c.probes.every_steps = 50
  c.probes.lipschitz_every_steps = 500
  c.num_train_steps = 200
  c.log_every_steps = 25
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 1
  return c


@dataclasses.dataclass
class Data:
  ds: Any                    # lipnorm.data.Dataset
  images: jax.Array          # the measurement batch [n, H, W, C]
  labels: jax.Array          # [n]

  @property
  def num_classes(self) -> int:
    return self.ds.info.num_classes


def load_data(train_cfg: ml_collections.ConfigDict, num_examples: int) -> Data:
  """The dataset of a training config and its first `num_examples` training examples
  (standardized, unaugmented) as the measurement batch."""
  ds = get_dataset(train_cfg.data, seed=train_cfg.seed, num_local_devices=1)
  pb = ds.probe_batch(min(num_examples, ds.info.num_train))
  return Data(ds, jnp.asarray(pb["image"]), jnp.asarray(pb["label"]))


def build_model(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
  return get_model(name, num_classes=num_classes, **dict(kwargs))


def init_variables(model: nn.Module, xs: jax.Array, *, seed: int) -> dict:
  """`model.init` on one example, keeping only params and batch_stats."""
  v = model.init({"params": jax.random.key(seed), "dropout": jax.random.key(seed)},
                 jnp.zeros((1, *xs.shape[1:]), xs.dtype), train=False)
  return {k: v[k] for k in ("params", "batch_stats") if k in v}


def fix_batch_stats(model: nn.Module, variables: Any, xs: jax.Array) -> Any:
  """BN running statistics := the batch statistics of `xs` (identity without BN)."""
  if not lipschitz.has_batchnorm(model):
    return variables
  return lipschitz.batch_fixed_variables(model, variables, xs)


def with_model(train_cfg: ml_collections.ConfigDict, name: str, kwargs: Mapping[str, Any]
               ) -> ml_collections.ConfigDict:
  """A copy of `train_cfg` training model `name` with exactly these model kwargs."""
  c = train_cfg.copy_and_resolve_references()
  kwargs = dict(kwargs)
  norm = kwargs.pop("norm", "none")
  opts = kwargs.pop("norm_options", {}) or {}
  with c.unlocked():
    c.model = ml_collections.ConfigDict({"name": name, "norm": norm,
                                         "norm_options": ml_collections.ConfigDict(opts),
                                         **kwargs})
  return c


def with_norm(train_cfg: ml_collections.ConfigDict, norm: str, options: Mapping[str, Any]
              ) -> ml_collections.ConfigDict:
  c = train_cfg.copy_and_resolve_references()
  c.model.norm = norm
  c.model.norm_options = ml_collections.ConfigDict(dict(options))
  return c


@dataclasses.dataclass
class Run:
  model: nn.Module           # `measurement_model`: single-device (no BN axis), float32
  variables: dict            # final (or last finite) params / batch_stats
  data: Data
  summary: dict
  workdir: pathlib.Path

  @property
  def diverged(self) -> bool:
    return self.summary.get("status") == "diverged"


class RunInterrupted(Exception):
  """A run an experiment trains stopped on SIGTERM / SIGINT (checkpoint saved at the
  step boundary): the experiment stops too, measuring nothing of the half-trained net.
  Rerunning the same command resumes the run and goes on."""


def train_run(train_cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path,
              **kwargs: Any) -> dict:
  """`lipnorm.training.train(train_cfg, workdir, **kwargs)`: trains, resumes or reuses
  the run in `workdir` and returns its summary (completed or diverged); RunInterrupted
  when it was preempted."""
  summary = train(train_cfg, str(workdir), **kwargs)
  if summary.get("status") == "preempted":
    raise RunInterrupted(f"the run in {str(workdir)!r} was interrupted at step "
                         f"{summary.get('step', '?')} (checkpoint saved); rerun the "
                         f"same command to resume it")
  return summary


def train_and_load(train_cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                   num_examples: int = 64) -> Run:
  """Trains (or resumes / reuses a finished run in `workdir`) and loads the last
  checkpoint (for a diverged run: the last finite one). RunInterrupted when the run
  was preempted."""
  workdir = pathlib.Path(workdir)
  summary = train_run(train_cfg, workdir)
  data = load_data(train_cfg, num_examples)
  state = load_checkpoint(str(workdir))["state"]
  variables = {"params": state["params"]}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  variables = jax.tree.map(jnp.asarray, variables)
  # Measured as the probes measure it: a bfloat16 run as the float32 net of its params.
  model = measurement_model(build_training_model(train_cfg, data.num_classes, pmap=False))
  return Run(model, variables, data, summary, workdir)


measure = lipschitz_metrics   # the experiments' measurements are the training hook's
