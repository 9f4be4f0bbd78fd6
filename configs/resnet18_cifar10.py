"""ResNet-18 on CIFAR-10 (GPU/TPU scale): SGD momentum 0.9, lr 0.1 cosine, weight decay
5e-4, batch 128, 200 epochs, standard crop+flip augmentation. Norm overridable
(`--config.model.norm=group`); bf16 compute with `--config.dtype=bfloat16`."""
from lipnorm.training.config_schema import base_config


def get_config():
  config = base_config()
  config.model.name = "resnet18"
  config.model.norm = "batch"

  config.data.source = "cifar10"
  config.data.batch_size = 128
  config.data.eval_batch_size = 500

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = "cosine"
  config.num_epochs = 200.0

  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
