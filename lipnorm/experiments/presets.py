"""Named presets for the experiments.

* `tiny`: bundled 8x8 digits, tiny models, a few steps (the test suite runs these).
* `cpu*`: real CIFAR-10 (pass `train.data.data_dir=...` or set $LIPNORM_DATA_DIR), sized
  to finish in minutes on 2 CPU cores: relu_net-10 (width 512) and a small CNN.
* `gpu*`: ResNet-18 / EfficientNet-B3 on CIFAR-10 from `configs/*_cifar10.py` with
  probes on, for one GPU/TPU host.
"""
from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from lipnorm.experiments import common
from lipnorm.training.config_schema import set_model

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def training_config_file(name: str) -> ml_collections.ConfigDict:
  """`get_config()` of `configs/<name>.py` (the repository's training configs)."""
  path = CONFIG_DIR / f"{name}.py"
  if not path.exists():
    raise ValueError(f"training config {str(path)!r} not found (presets that use it need "
                     "a source checkout of lipnorm)")
  spec = importlib.util.spec_from_file_location(f"lipnorm_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _with_probes(c: ml_collections.ConfigDict, every: int, spectral_every: int,
                 lipschitz_every: int) -> ml_collections.ConfigDict:
  c.probes.enabled = True
  c.probes.every_steps = every
  c.probes.spectral_every_steps = spectral_every
  c.probes.lipschitz_every_steps = lipschitz_every
  return c


def tiny_train(steps: int = 6) -> ml_collections.ConfigDict:
  """relu_net depth 3, width 16 on 8x8 digits; probes every 2 steps, Lipschitz every 3."""
  c = common.train_config()
  c.data.source = "digits"
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.model.name = "relu_net"
  c.model.depth = 3
  c.model.width = 16
  c.optimizer.learning_rate = 0.05
  c.num_train_steps = steps
  c.log_every_steps = 2
  c.eval_every_steps = steps
  c.checkpoint_every_steps = steps
  _with_probes(c, 2, 2, 3)
  c.probes.batch_size = 32
  c.probes.lipschitz_examples = 4
  c.probes.lipschitz_bn_modes = ("eval", "batch_fixed")
  c.probes.hessian_examples = 16
  return c


def cifar_relu10(steps: int, norm: str = "none") -> ml_collections.ConfigDict:
  """configs/relu10_cifar10.py (relu_net-10, width 512, SGD 0.01 cosine) for `steps`."""
  c = training_config_file("relu10_cifar10")
  c.model.norm = norm
  c.num_train_steps = steps
  c.log_every_steps = 50
  c.eval_every_steps = max(steps // 4, 1)
  c.checkpoint_every_steps = steps
  c.keep_checkpoints = 1
  return _with_probes(c, 50, 250, max(steps // 2, 1))


def cifar_cnn(steps: int, norm: str = "none") -> ml_collections.ConfigDict:
  """A small VGG-style CNN (the `cnn` model's defaults) on CIFAR-10, same optimizer."""
  c = cifar_relu10(steps, norm)
  set_model(c, "cnn", norm=norm)         # drops relu_net's depth, width, ...
  c.optimizer.learning_rate = 0.02
  # conv operator norms at every layer probe: warm-started Lanczos, ~1.5 s per probe on CPU
  c.probes.spectral_every_steps = c.probes.every_steps
  return c


def cifar_resnet18_narrow(steps: int, width: int = 16, norm: str = "batch"
                          ) -> ml_collections.ConfigDict:
  """configs/resnet18_cifar10.py with `width` base channels (64 in the real model) for
  `steps`: the ResNet-18 architecture (20 convs, 20 BNs) at CPU cost."""
  c = training_config_file("resnet18_cifar10")
  c.model.norm = norm
  c.model.width = width
  c.num_train_steps = steps
  c.log_every_steps = 25
  c.eval_every_steps = max(steps // 2, 1)
  c.checkpoint_every_steps = steps
  c.keep_checkpoints = 1
  # Conv operator norms at every layer probe: the first costs ~1-2 min on CPU (compile,
  # cold Lanczos), later ones ~1 s more than a plain probe (warm-started Lanczos).
  return _with_probes(c, 25, 25, steps)


def gpu(name: str, epochs: float, norm: str) -> ml_collections.ConfigDict:
  c = training_config_file(name)
  c.model.norm = norm
  c.num_epochs = epochs
  c.keep_checkpoints = 1
  c = _with_probes(c, 200, 1000, 2000)
  c.probes.lipschitz_bn_modes = ("eval", "batch_fixed")
  c.probes.lipschitz_examples = 32
  return c
