"""ResNet-18 on CIFAR-10 (GPU/TPU scale): SGD momentum 0.9, lr 0.1 cosine, weight decay
5e-4, batch 128, 200 epochs, standard crop+flip augmentation. Norm overridable
(`--config.model.norm=group`); bf16 compute with `--config.dtype=bfloat16`."""
from lipnorm.training.config_schema import cifar10_sgd_recipe


def get_config():
  return cifar10_sgd_recipe("resnet18")
