"""The training engine: `train(config, workdir) -> summary` and its parts.

Modules: `config_schema` (fields, defaults, checks), `overrides` (the `--config.a.b=v`
syntax of every CLI), `optim` (optimizer / schedule registries), `state` (model +
TrainState), `steps` (pmap'd train / eval steps, the evaluation numbers),
`checkpointing` (Orbax), `run_log` (the metrics.jsonl / summary.json contract: format,
reading rule, typed records), `metrics_writer` (JSONL + TensorBoard writer, progress),
`hooks` (extension point for probes), `distributed` (multi-host), `workdir` (the
directory and its config.json), `loop` (the run).
"""
from lipnorm.lazy_exports import lazy_exports

# Imported on first use: `lipnorm.training.config_schema` (all `train.py` needs to refuse a
# bad flag or config) then loads without JAX.
_EXPORTS = {
    "load_checkpoint": "checkpointing",
    "ConfigError": "config_schema", "base_config": "config_schema",
    "validate_config": "config_schema",
    "Hook": "hooks", "build_hooks": "hooks",
    "EXIT_CODES": "loop", "evaluate": "loop", "num_train_steps": "loop", "train": "loop",
    "make_optimizer": "optim", "make_schedule": "optim", "optimizer_names": "optim",
    "schedule_names": "optim",
    "read_metrics": "run_log", "read_records": "run_log", "read_summary": "run_log",
    "TrainState": "state", "build_model": "state", "create_train_state": "state",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
