"""Trains a lipnorm model from an ml_collections config file.

  python train.py --config=configs/default.py --workdir=runs/default
  python train.py --config=configs/default.py --workdir=runs/bn --config.model.norm=batch

Any config field can be overridden as --config.<a>.<b>=<value> (see
lipnorm/training/config_schema.py for every field). Rerunning with the same --workdir
resumes from its latest checkpoint; a workdir holding a different config is refused
unless --override_config is given.

Exit codes: 0 completed, 2 bad config or workdir, 3 diverged (non-finite loss or
gradient; the last finite checkpoint is kept), 4 preempted (SIGTERM/SIGINT; a
checkpoint was saved: rerun the same command to resume).
"""
import json
import re
import sys

from absl import app, flags, logging
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


def _parse_flags(argv):
  """absl's parser, plus one clear line (exit 2) for an override of a key the config lacks
  (ml_collections raises KeyError / AttributeError for those)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:
    text = e
    while isinstance(text, BaseException) and text.args:  # ml_collections nests errors
      text = text.args[0]
    text = str(text)
    key = re.findall(r"'([^']+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    bad = next((a for a in argv[1:] if key and a.startswith("--config.")
                and f".{key[0]}" in a.split("=")[0]), None)
    print(f"error: {bad or 'a --config override'}: no such config key"
          f"{' ' + repr(key[0]) if key else ''}"
          f"{'; did you mean ' + repr(hint.group(1)) + '?' if hint else ''} "
          f"(all fields: lipnorm/training/config_schema.py)", file=sys.stderr)
    sys.exit(EXIT_BAD_CONFIG)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lipnorm.training import EXIT_CODES, ConfigError, train
  from lipnorm.training.metrics_writer import quiet_library_logs
  quiet_library_logs()
  try:
    summary = train(_CONFIG.value, _WORKDIR.value, override_config=_OVERRIDE.value)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_CONFIG
  logging.info("summary: %s", json.dumps(summary))
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
