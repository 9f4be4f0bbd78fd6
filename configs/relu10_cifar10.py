"""A 10-layer ReLU net (width 512) on CIFAR-10 from the official local archive
(`--config.data.data_dir=/path/to/dir/with/cifar-10-binary.tar.gz` unless the data
pipeline finds it). Norm overridable: `--config.model.norm=batch`."""
from lipnorm.training.config_schema import base_config, set_model


def get_config():
  config = base_config()
  set_model(config, "relu_net", depth=10, width=512, norm="none")

  config.data.source = "cifar10"
  config.data.batch_size = 128
  config.data.eval_batch_size = 500

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = "cosine"
  config.num_epochs = 100.0

  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
