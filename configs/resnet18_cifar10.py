"""ResNet-18 on CIFAR-10 (GPU/TPU scale), the standard CIFAR-10 recipe: BN, batch 128,
SGD momentum 0.9, lr 0.1 cosine, weight decay 5e-4, 200 epochs, crop+flip augmentation
(the CIFAR default), evaluation and checkpoints every 2000 steps. Norm overridable
(`--config.model.norm=group`); bf16 compute with `--config.dtype=bfloat16`.
`configs/efficientnet_b3_cifar10.py` builds on this recipe."""
from lipnorm.training.config_schema import base_config, set_model


def get_config(model_name: str = "resnet18"):
  config = base_config()
  # every option of the model is listed: `--config.model.width=16`, `conv_impl`, ...
  set_model(config, model_name, norm="batch")
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
