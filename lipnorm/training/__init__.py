"""The training engine: `train(config, workdir) -> summary` and its parts.

Modules: `config_schema` (fields, defaults, checks), `overrides` (the `--config.a.b=v`
syntax of every CLI), `optim` (optimizer / schedule registries), `state` (model +
TrainState), `steps` (pmap'd train / eval steps, the evaluation numbers),
`checkpointing` (Orbax), `run_log` (the metrics.jsonl / summary.json contract: format,
reading rule, typed records), `metrics_writer` (JSONL + TensorBoard writer, progress),
`hooks` (extension point for probes), `distributed` (multi-host), `workdir` (the
directory and its config.json), `loop` (the run).
"""
from lipnorm.training.checkpointing import load_checkpoint
from lipnorm.training.config_schema import ConfigError, base_config, validate_config
from lipnorm.training.hooks import Hook, build_hooks
from lipnorm.training.loop import EXIT_CODES, evaluate, num_train_steps, train
from lipnorm.training.optim import (make_optimizer, make_schedule, optimizer_names,
                                    schedule_names)
from lipnorm.training.run_log import read_metrics, read_records, read_summary
from lipnorm.training.state import TrainState, build_model, create_train_state

__all__ = ["load_checkpoint", "ConfigError", "base_config", "validate_config", "Hook",
           "build_hooks", "EXIT_CODES", "evaluate", "num_train_steps", "train",
           "make_optimizer", "make_schedule", "optimizer_names", "schedule_names",
           "TrainState", "build_model", "create_train_state", "read_metrics", "read_records",
           "read_summary"]
