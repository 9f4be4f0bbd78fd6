"""`python -m lipnorm.experiments <name> [--preset P] [--out DIR] [--config.a.b=value ...]`.

Overrides use train.py's syntax, `--config.a.b=value`, parsed by the same ml_collections
parser (`lipnorm.training.overrides`); the older bare `a.b=value` form is still read.
Then dispatches to the experiment's importable `run(config)`. Bad input (an unknown key,
a value of the wrong type, a bad preset or config value) is one line on stderr and exit
code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import ml_collections

from lipnorm.experiments.common import RunInterrupted
from lipnorm.experiments.registry import EXPERIMENTS, get_config, get_experiment
from lipnorm.training.loop import EXIT_CODES
from lipnorm.training.overrides import apply_overrides as apply_config_overrides
from lipnorm.training.overrides import first_line

EXIT_BAD_INPUT = 2


def as_flag(item: str) -> str:
  """`a.b=value` -> `--config.a.b=value`; `--config.a.b=value` unchanged."""
  if item.startswith("-"):
    return item
  key, sep, _ = item.partition("=")
  if not sep or not key:
    raise ValueError(f"override {item!r} is not of the form --config.key=value")
  return f"--config.{item}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` (or `a.b=value`) overrides in place; ValueError (one
  line) for a malformed entry, an unknown key or a value of the wrong type."""
  return apply_config_overrides(config, [as_flag(o) for o in overrides])


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
    p.add_argument("overrides", nargs="*",
                   help="config overrides --config.key=value (or key=value)")
  return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  """argparse (exit 2 with usage on its own errors), with `--config.*` items kept as
  overrides in order."""
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  unknown = [a for a in extra if not a.startswith(("--config.", "--noconfig."))]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  args.overrides = list(args.overrides) + extra if extra else list(args.overrides)
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  try:
    config = get_config(args.experiment, args.preset)
    apply_overrides(config, args.overrides)
    if args.out is not None:
      config.out_dir = args.out
    if args.print_config:
      print(config)
      return 0
    summary = get_experiment(args.experiment).run(config)
  except ValueError as e:   # bad input, incl. lipnorm.training.ConfigError
    print(f"error: {first_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except RunInterrupted as e:
    print(f"interrupted: {e}", file=sys.stderr)
    return EXIT_CODES["preempted"]
  print(json.dumps(summary, indent=1, default=str)[:4000])
  return 0


if __name__ == "__main__":
  sys.exit(main())
