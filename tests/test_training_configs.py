"""Every config in configs/ validates and trains a few steps with tiny overrides, through
the real data pipeline (digits, or a small CIFAR-10 archive written for the test)."""
import numpy as np
import pytest

from data_writers import random_images, write_cifar10
from lipnorm.training import train, validate_config
from training_helpers import CONFIGS, load_config, set_fields


# Per config: overrides that keep the model family but make it tiny.
TINY = {
    "default": {"model.width": 16},
    "relu10_cifar10": {"model.width": 16},
    "resnet18_cifar10": {"model.width": 8},
    # Two MBConv blocks (without and with expansion) instead of B3's 26: every code path
    # (squeeze-excite, stochastic depth, dropout) at a fraction of the compile time.
    "efficientnet_b3_cifar10": {"model.blocks": ((1, 3, 2, 1, 32, 16), (1, 3, 2, 6, 16, 24)),
                                "model.width_coefficient": 0.25, "model.top_filters": 64},
}


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
  """An official-format CIFAR-10 archive with 5 x 4 training and 8 test images."""
  rng = np.random.default_rng(0)
  parts = [(random_images(rng, 4), rng.integers(0, 10, 4)) for _ in range(5)]
  root = tmp_path_factory.mktemp("cifar")
  write_cifar10(root, parts, (random_images(rng, 8), rng.integers(0, 10, 8)))
  return root


def test_every_config_file_is_covered():
  assert sorted(p.stem for p in CONFIGS.glob("*.py")) == sorted(TINY)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_config_trains_a_few_steps(name, tmp_path, cifar_dir):
  config = load_config(name)
  validate_config(config)
  set_fields(config, {**TINY[name], "data.batch_size": 8, "data.eval_batch_size": 8,
                      "num_train_steps": 2, "schedule.warmup_steps": 0,
                      "log_every_steps": 2, "eval_every_steps": 2,
                      "checkpoint_every_steps": 2})
  if config.data.source == "cifar10":
    config.data.data_dir = str(cifar_dir)
  else:
    config.data.num_train, config.data.num_test = 64, 16
  summary = train(config, str(tmp_path), interactive=False)
  assert summary["status"] == "completed" and summary["step"] == 2
  assert np.isfinite(summary["final"]["eval_loss"])
