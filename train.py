"""Trains a lipnorm model from an ml_collections config file.

  python train.py --config=configs/default.py --workdir=runs/default
  python train.py --config=configs/default.py --workdir=runs/bn --config.model.norm=batch

Any config field can be overridden as --config.<a>.<b>=<value> (see
lipnorm/training/config_schema.py for every field). Rerunning with the same --workdir
resumes from its latest checkpoint; a workdir holding a different config is refused
unless --override_config is given.

The summary (also <workdir>/summary.json) is printed to stdout as one JSON line.
Rerunning a completed run with the same config changes nothing and prints its summary.

Exit codes: 0 completed (and --help), 2 bad input: a flag problem (missing --config or
--workdir, a value of the wrong type, an unknown config key), a bad config value, a
model the config cannot build, a workdir that is a file or not writable, a workdir
holding another run (one line on stderr, before any work); 3 diverged (non-finite loss
or gradient; the last finite checkpoint is kept), 4 preempted (SIGTERM/SIGINT; a
checkpoint was saved: rerun the same command to resume).
"""
import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/default.py; override fields with "
    "--config.model.norm=batch etc.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config.json, metrics.jsonl, tensorboard/, "
    "checkpoints/, summary.json. Resumed if it holds a checkpoint.")
_OVERRIDE = flags.DEFINE_bool(
    "override_config", False, "Reuse a workdir whose stored config differs from --config "
    "(its checkpoint is resumed when compatible).")
flags.mark_flags_as_required(["config", "workdir"])

from lipnorm.training.config_schema import fields_help  # noqa: E402

__doc__ += f"""
Config fields and their base defaults (config files change values; `model.*` also takes
the chosen model's keyword arguments, e.g. depth, width, norm_layers):
{fields_help()}
"""

EXIT_BAD_CONFIG = 2


def _usage_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_CONFIG)


def _parse_flags(argv):
  """absl's parser with this CLI's rules: --help exits 0; any flag problem (a missing
  --config or --workdir, a value the field's type refuses, a key the config lacks) is
  one line on stderr and exit code 2."""
  if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
    flags.FLAGS.mark_as_parsed()
    app.usage(shorthelp=True, writeto_stdout=True)
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, SyntaxError) as e:
    _usage_error(_flag_error_line(argv, e))


def _flag_error_line(argv, error: BaseException) -> str:
  """The one line for a failed parse: an unknown override key is looked up in the loaded
  config file (ml_collections raises it as a bare KeyError / AttributeError)."""
  from lipnorm.training.config_schema import load_config_file
  from lipnorm.training.overrides import first_line, override_args, unknown_key_error
  config_args = [a for a in argv[1:] if a.startswith(("--config=", "-config="))]
  overrides = override_args(argv[1:])
  if isinstance(error, (KeyError, AttributeError)) and config_args and overrides:
    path, _, arg = config_args[-1].split("=", 1)[1].partition(":")
    try:
      bad = unknown_key_error(load_config_file(path, *([arg] if arg else [])), overrides)
    except Exception as e:  # noqa: BLE001 -- the config file itself fails: say that
      return f"--config={path}: {type(e).__name__}: {first_line(e)}"
    if bad:
      return bad
  return first_line(error)


def main(argv):
  if len(argv) > 1:
    _usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
  from lipnorm.training import EXIT_CODES, ConfigError, train
  from lipnorm.training.metrics_writer import quiet_library_logs
  quiet_library_logs()
  try:
    summary = train(_CONFIG.value, _WORKDIR.value, override_config=_OVERRIDE.value)
  except ConfigError as e:
    _usage_error(str(e))
  print(json.dumps(summary, sort_keys=True))   # stdout: the summary, for scripts
  status = summary["status"]
  if status == "diverged":
    print(f"diverged at step {summary['diverged_step']} (expected for some unnormalized "
          f"nets); last finite checkpoint: step {summary['last_checkpoint_step']}",
          file=sys.stderr)
  elif status == "preempted":
    print(f"stopped by signal at step {summary['step']}; checkpoint saved, rerun the same "
          f"command to resume", file=sys.stderr)
  return EXIT_CODES[status]


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
