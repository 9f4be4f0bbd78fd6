"""EfficientNet-B3 on CIFAR-10 (GPU/TPU scale): SGD momentum 0.9, lr 0.1 cosine with 5
warmup epochs' worth of steps, weight decay 5e-4, batch 128, 200 epochs, crop+flip
augmentation. Norm overridable (`--config.model.norm=group`); bf16 compute with
`--config.dtype=bfloat16`."""
from lipnorm.training.config_schema import cifar10_sgd_recipe


def get_config():
  config = cifar10_sgd_recipe("efficientnet_b3")
  config.schedule.warmup_steps = 1950   # 5 epochs of 390 steps
  return config
