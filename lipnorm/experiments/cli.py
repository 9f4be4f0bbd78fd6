"""`python -m lipnorm.experiments <name> [--preset P] [--out DIR] [key=value ...]`.

Parses, applies `key=value` overrides (dotted keys, values as Python literals, else
strings) to the experiment's config and dispatches to its importable `run(config)`.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Sequence

import ml_collections

from lipnorm.experiments.registry import EXPERIMENTS, get_config, get_experiment


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
  """Sets `a.b=value` entries; ValueError for a malformed entry or an unknown key."""
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ValueError(f"override {item!r} is not of the form key=value")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise ValueError(f"unknown config key {key!r}; valid top-level keys: "
                         f"{sorted(config.keys())}")
      node = node[p]
    if parts[-1] not in node:
      raise ValueError(f"unknown config key {key!r}; valid keys here: {sorted(node.keys())}")
    old = node[parts[-1]]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    with node.ignore_type():
      node[parts[-1]] = value
  return config


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m lipnorm.experiments",
                                   description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="experiment", required=True)
  for name in EXPERIMENTS:
    exp = get_experiment(name)
    p = sub.add_parser(name, help=exp.description, description=exp.description)
    p.add_argument("--preset", default="default",
                   help=f"one of: default, {', '.join(sorted(exp.presets))}")
    p.add_argument("--out", default=None, help="output folder (config.out_dir)")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  config = get_config(args.experiment, args.preset)
  apply_overrides(config, args.overrides)
  if args.out is not None:
    config.out_dir = args.out
  if args.print_config:
    print(config)
    return 0
  summary = get_experiment(args.experiment).run(config)
  print(json.dumps(summary, indent=1, default=str)[:4000])
  return 0


if __name__ == "__main__":
  sys.exit(main())
