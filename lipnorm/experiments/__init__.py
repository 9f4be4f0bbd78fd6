"""Paper experiments E1-E4 (SPEC section 4): importable `run_*(config)` functions, each
writing figures and markdown to `config.out_dir`, and the CLI
`python -m lipnorm.experiments <sweep|dynamics|compare|regime> [--preset P] [key=value ...]`.
"""
from lipnorm.experiments import dynamics
from lipnorm.experiments.registry import (EXPERIMENTS, Experiment, get_config, get_experiment,
                                          register)

register(Experiment("dynamics", "E2: seed Figures 1-3 from a training workdir's JSONL",
                    dynamics.default_config, dynamics.run_dynamics, {}))

__all__ = ["EXPERIMENTS", "Experiment", "get_config", "get_experiment", "register"]
