"""Every config in configs/ validates and trains a few steps with tiny overrides."""
import importlib.util
import pathlib

import numpy as np
import pytest

from lipnorm.models import model_names
from lipnorm.training import train, validate_config
from training_fakes import fake_dataset_fn

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# Per config: model-size overrides that keep the family but make it tiny.
TINY_MODEL = {
    "default": {"width": 16},
    "relu10_cifar10": {"width": 16},
    "resnet18_cifar10": {},
    "efficientnet_b3_cifar10": {},
}


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_every_config_file_is_covered():
  assert sorted(p.stem for p in CONFIGS.glob("*.py")) == sorted(TINY_MODEL)


@pytest.mark.parametrize("name", sorted(TINY_MODEL))
def test_config_trains_a_few_steps(name, tmp_path):
  config = load_config(name)
  if config.model.name not in model_names():
    pytest.skip(f"model {config.model.name!r} is not registered on this branch yet")
  validate_config(config)
  for key, value in TINY_MODEL[name].items():
    config.model[key] = value
  config.data.batch_size = config.data.eval_batch_size = 8
  config.num_train_steps = 2
  config.schedule.warmup_steps = 0
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  summary = train(config, str(tmp_path),
                  dataset_fn=fake_dataset_fn(image_shape=(8, 8, 3), num_classes=10,
                                             num_train=32, num_test=8),
                  interactive=False)
  assert summary["status"] == "completed" and summary["step"] == 2
  assert np.isfinite(summary["final"]["eval_loss"])
