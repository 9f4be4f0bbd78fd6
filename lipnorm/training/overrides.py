"""Command-line config overrides, one syntax for every CLI: `--config.a.b=value`.

`train.py` gets them from ml_collections' `config_flags.DEFINE_config_file`; the
experiments CLI from `apply_overrides`, which runs the same ml_collections parser on
its config (values parsed by the field's type: int, float, bool, str, tuples as
`(1, 2)`; a normalizer option such as `--config.model.norm_options.num_groups=8`
through its typed placeholder field). A key the config lacks is reported by
`unknown_key_error` (found by looking the path up, never by reading error text).
"""
from __future__ import annotations

import difflib
import re
from typing import Optional, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

FIELDS_DOC = "lipnorm/training/config_schema.py"


def override_args(argv: Sequence[str], name: str = "config") -> list[str]:
  """The `--<name>.a.b=value` arguments of `argv`, in order."""
  pattern = re.compile(rf"^--?(no)?{re.escape(name)}\.")
  return [a for a in argv if pattern.match(a)]


def override_path(arg: str, name: str = "config") -> str:
  """`a.b` of `--config.a.b=value` (or of `--noconfig.a.b`)."""
  key = arg.lstrip("-").split("=", 1)[0]
  key = key[2:] if key.startswith("no" + name + ".") else key
  return key[len(name) + 1:]


def unknown_key_error(config: ml_collections.ConfigDict, args: Sequence[str],
                      name: str = "config", fields_doc: Optional[str] = FIELDS_DOC
                      ) -> Optional[str]:
  """One line naming the first override of `args` whose key `config` lacks (with the
  closest valid key), or None when every key exists."""
  for arg in args:
    path = override_path(arg, name)
    parts = path.split(".")
    for i in range(len(parts)):
      try:
        node = config_path.get_value(".".join(parts[:i]), config) if i else config
        config_path.get_value(".".join(parts[:i + 1]), config)
      except (KeyError, AttributeError, IndexError, ValueError):
        keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(parts[i], keys, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (
            f"; valid keys{' in ' + name + '.' + '.'.join(parts[:i]) if i else ''}: "
            f"{', '.join(keys)}" if keys else "")
        where = f" (all fields: {fields_doc})" if fields_doc else ""
        return f"{arg}: no such config key {parts[i]!r}{hint}{where}"
  return None


def apply_overrides(config: ml_collections.ConfigDict, args: Sequence[str],
                    name: str = "config") -> ml_collections.ConfigDict:
  """Applies `--<name>.a.b=value` overrides to `config` in place with ml_collections'
  own flag parser (so values parse exactly as in train.py); returns it. ValueError (one
  line) for an unknown key or a value the field's type does not accept."""
  bad = unknown_key_error(config, args, name, fields_doc=None)
  if bad:
    raise ValueError(bad)
  values = flags.FlagValues()
  argv = ["overrides", *args]
  try:
    config_flags.DEFINE_config_dict(name, config, flag_values=values, lock_config=False,
                                    sys_argv=argv)
    values(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    raise ValueError(first_line(e)) from None
  return config


def first_line(error: BaseException) -> str:
  """The first line of an error's message (a KeyError's quotes removed)."""
  text = str(error).strip()
  if isinstance(error, KeyError) and len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1]
  return text.splitlines()[0] if text else type(error).__name__
