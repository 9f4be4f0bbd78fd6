"""The main job: a 10-layer ReLU net on the embedded 8x8 digits (offline, under a minute
on 2 CPU cores), with layer probes and Lipschitz measurements logged as it trains. Unnormalized by default; BatchNorm on every hidden layer is one
override away: `--config.model.norm=batch` (or layer, group, instance, rms)."""
from lipnorm.training.config_schema import base_config, set_model


def get_config():
  config = base_config()
  # every relu_net option is listed (`--config.model.activation=tanh` works too)
  set_model(config, "relu_net",
            depth=10,              # linear maps: 9 hidden layers + the output layer
            width=128, norm="none")

  config.data.source = "digits"
  config.data.batch_size = 64
  config.data.eval_batch_size = 256

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.schedule.name = "cosine"
  config.num_epochs = 30.0

  config.log_every_steps = 25
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 200

  # The point of the project, measured as it trains: per-layer input variances and weight
  # norms, and (at steps 0, 300, 600 and the end) local Lipschitz constants w.r.t. input
  # and parameters, the sound upper bound and the loss Hessian's top eigenvalue.
  config.probes.enabled = True
  config.probes.every_steps = 100
  config.probes.spectral_every_steps = 100
  config.probes.lipschitz_every_steps = 300
  return config
