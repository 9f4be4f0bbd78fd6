"""EfficientNet-B3 on CIFAR-10 (GPU/TPU scale): the CIFAR-10 recipe of
`configs/resnet18_cifar10.py` (SGD momentum 0.9, lr 0.1 cosine, weight decay 5e-4,
batch 128, 200 epochs, crop+flip) with 5 warmup epochs' worth of steps. Norm overridable
(`--config.model.norm=group`); bf16 compute with `--config.dtype=bfloat16`."""
import os

from lipnorm.training.config_schema import load_config_file


def get_config():
  config = load_config_file(os.path.join(os.path.dirname(__file__), "resnet18_cifar10.py"),
                            "efficientnet_b3")
  config.schedule.warmup_steps = 1950   # 5 epochs of 390 steps
  return config
