"""The experiment registry: name -> (default config, runner, presets)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from lipnorm.registry import Registry


@dataclasses.dataclass(frozen=True)
class Experiment:
  """`run(config) -> summary` writes its outputs to `config.out_dir`; `presets` maps a
  preset name to a function returning a full config (default_config with overrides)."""
  name: str
  description: str
  default_config: Callable[[], ml_collections.ConfigDict]
  run: Callable[[ml_collections.ConfigDict], Any]
  presets: dict[str, Callable[[], ml_collections.ConfigDict]]


EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def register(exp: Experiment) -> Experiment:
  return EXPERIMENTS.register(exp.name)(exp)


def get_experiment(name: str) -> Experiment:
  return EXPERIMENTS.get(name)


def get_config(name: str, preset: str = "default") -> ml_collections.ConfigDict:
  """The config of experiment `name` under `preset` ("default" = default_config())."""
  exp = get_experiment(name)
  if preset == "default":
    return exp.default_config()
  if preset not in exp.presets:
    raise ValueError(f"unknown preset {preset!r} for experiment {name!r}; valid presets: "
                     f"{', '.join(['default', *sorted(exp.presets)])}")
  return exp.presets[preset]()
