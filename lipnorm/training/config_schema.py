"""The training config: every field with its default (`base_config`) and its checks.

This module holds the defaults, in one place; recipes (values for a model and dataset)
live in `configs/`. A config file starts from `base_config()` and changes values; it may
add keys only under `config.model` (keyword arguments of the chosen model, checked by
`lipnorm.models.get_model`). `base_config()` is locked (ml_collections' own mechanism)
everywhere but `config.model`, so a typo such as `config.optimizer.momemtum = 0.5`
raises at once, and `--config.optimizer.momemtum=0.5` is refused by the flag parser;
`validate_config` merges any other config (e.g. built from a dict) into `base_config()`,
so an unknown key is refused the same way there.

Fields (see README "Training" for the full story):
  seed                      int, seeds parameter init, data order and dropout.
  model.name, model.norm    model / normalizer registry names; other `model.*` keys are
                            model kwargs (`depth`, `width`, `norm_layers`, ...).
                            `set_model` lists all of a model's options in a config, so
                            each can be set from the command line.
  model.norm_options.*      normalizer options: epsilon, momentum (BN), num_groups or
                            group_size (GN), use_scale, use_bias; None (unset) = the
                            normalizer's default. `--config.model.norm_options.num_groups=8`.
  bn_stats                  "global": BN batch statistics over the global batch (synced
                            over the pmap axis); "per_device": over each device's shard.
                            Running statistics are identical on every replica either way.
  dtype                     "float32" or "bfloat16" (compute dtype; params stay float32).
  data.*                    passed to `lipnorm.data.get_dataset` (batch sizes are GLOBAL;
                            source, data_dir, augment, standardize, num_train/num_test
                            subsets, digits_test_fraction, prefetch, crop_padding,
                            download: fetch missing official files, default False).
  optimizer.*               name (sgd, adam, adamw), learning_rate, momentum, nesterov,
                            b1, b2, eps, weight_decay, grad_clip_norm (0 = off).
  schedule.*                name (constant, cosine, step), warmup_steps (linear warmup
                            prepended to any schedule), final_lr_fraction (cosine),
                            step_boundaries (fractions of training), step_factor.
  label_smoothing           in [0, 1).
  num_train_steps           > 0, or -1 to derive it from num_epochs.
  num_epochs                used when num_train_steps == -1.
  log_every_steps, eval_every_steps, checkpoint_every_steps, keep_checkpoints.
  probes.*                  consumed by `lipnorm.training.hooks.build_hooks`; fields,
                            defaults and checks in `lipnorm.probes.options`.
  distributed.*             multi-host setup, see `lipnorm.training.distributed`.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Iterable, Optional

import ml_collections
from ml_collections.config_dict import placeholder

from lipnorm.bn_modes import BN_STATS_SCOPES
from lipnorm.probes.options import PROBE_OPTIONS, validate_probe_options

DTYPES = ("float32", "bfloat16")
DISTRIBUTED_MODES = ("auto", "on", "off")
# `config.model.norm_options` fields and their types; unset (None) = the normalizer's default.
NORM_OPTION_FIELDS = {"epsilon": float, "momentum": float, "num_groups": int,
                      "group_size": int, "use_scale": bool, "use_bias": bool}


class ConfigError(ValueError):
  """A bad config value; its message is one line naming the key, value and what is allowed."""


def base_config() -> ml_collections.ConfigDict:
  """Every training field with its default, locked except `model` (open for the model's
  keyword arguments; `model.norm_options` is locked too). Config files override values.
  (One line per field: the defaults are meant to be read in one place, hence its length.)"""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "relu_net"
  c.model.norm = "none"
  c.model.norm_options = ml_collections.ConfigDict(
      {k: placeholder(t) for k, t in NORM_OPTION_FIELDS.items()})
  c.bn_stats = "global"
  c.dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"
  c.data.data_dir = placeholder(str)
  c.data.batch_size = 128
  c.data.eval_batch_size = 256
  c.data.augment = placeholder(bool)     # None: the dataset's own default
  c.data.standardize = True
  c.data.num_train = placeholder(int)    # None: the whole split
  c.data.num_test = placeholder(int)
  c.data.digits_test_fraction = 0.2      # digits: test share of the stratified split
  c.data.prefetch = 2                    # batches prepared ahead in a thread (0 = none)
  c.data.crop_padding = 4                # augmentation: zero padding for the random crop
  c.data.download = False                # fetch missing official files (lipnorm.data.download)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9             # sgd
  c.optimizer.nesterov = False           # sgd
  c.optimizer.b1 = 0.9                   # adam, adamw
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0         # sgd/adam: L2 added to the gradient; adamw: decoupled
  c.optimizer.grad_clip_norm = 0.0       # clip by global norm; 0 = off

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 0
  c.schedule.final_lr_fraction = 0.0     # cosine: lr at the last step / peak lr
  c.schedule.step_boundaries = (0.5, 0.75)  # step: fractions of the post-warmup steps
  c.schedule.step_factor = 0.1           # step: lr multiplier at each boundary

  c.label_smoothing = 0.0
  c.num_train_steps = -1
  c.num_epochs = 10.0
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3

  c.probes = ml_collections.ConfigDict(dict(PROBE_OPTIONS))  # lipnorm.probes.options

  c.distributed = ml_collections.ConfigDict()
  c.distributed.mode = "auto"            # auto / on / off: see lipnorm.training.distributed
  c.distributed.coordinator_address = placeholder(str)  # "host:port" of process 0
  c.distributed.num_processes = placeholder(int)
  c.distributed.process_id = placeholder(int)
  c.distributed.initialization_timeout_s = 300
  c.lock()
  c.model.unlock()
  c.model.norm_options.lock()
  return c


def load_config_file(path: str, *args: str) -> ml_collections.ConfigDict:
  """`get_config(*args)` of a config file such as `configs/default.py`; a config file may
  build on another one (e.g. `configs/efficientnet_b3_cifar10.py` on
  `configs/resnet18_cifar10.py`) by loading it with this function."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found")
  name = "lipnorm_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def fields_help() -> str:
  """Every field of `base_config()` with its default, one per line (for --help)."""
  def walk(node, prefix=""):
    for key in sorted(node.keys()):
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict) and value:
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"  {prefix}{key} = {_plain(value)!r}"
  return "\n".join(walk(base_config()))


def _fail(key: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config.{key}={value!r} is not allowed; allowed: {allowed}")


def _one_of(config, key: str, names: Iterable[str]) -> None:
  value = _get(config, key)
  names = list(names)
  if value not in names:
    _fail(key, value, ", ".join(map(str, names)))


def _get(config, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _number(config, key: str, *, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
  value = _get(config, key)
  kind = "an integer" if integer else "a number"
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  ok = ok and not isinstance(value, bool)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    _fail(key, value, f"{kind} {' and '.join(s for s in (lo, hi) if s)}".strip())


def set_model(config, name: str, **values: Any) -> None:
  """Sets `config.model.name = name`, replaces the previous model's options (the
  normalizer, `norm` and `norm_options`, is kept) with every option of that model at its
  default (`lipnorm.models.model_options`: e.g. ResNet's `width`, `stage_sizes`,
  `conv_impl`), then applies `values`, so that each option can be overridden from the
  command line (`--config.model.width=16`). Builds the same model as listing only
  `values`."""
  from lipnorm.models import model_options
  for key in [k for k in config.model.keys() if k not in ("norm", "norm_options")]:
    del config.model[key]
  config.model.name = name
  for key, value in {**model_options(name), **values}.items():
    config.model[key] = value


def resolve_config(config) -> ml_collections.ConfigDict:
  """`base_config()` updated with every value of `config` (a ConfigDict or dict): unset
  fields get their defaults, and a key `base_config()` lacks (outside `config.model`) is
  refused by its lock, as a ConfigError naming the key and the valid ones."""
  resolved = base_config()
  _merge(resolved, config, "")
  return resolved


def _merge(target: ml_collections.ConfigDict, source, prefix: str) -> None:
  for key in source.keys():
    value, dotted = source[key], f"{prefix}{key}"
    current = target.get(key) if key in target else None
    if isinstance(current, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        _fail(dotted, value, "a group of fields")
      _merge(current, value, dotted + ".")
      continue
    try:
      with target.ignore_type():   # values are checked by validate_config, with its messages
        target[key] = value
    except (KeyError, AttributeError):   # the lock: no such field
      parent = prefix.rstrip(".")
      _fail(dotted, value, f"no such key; valid keys{' in config.' + parent if parent else ''}"
            f": {', '.join(sorted(target.keys()))}")


def model_kwargs(config) -> dict[str, Any]:
  """Keyword arguments for `get_model` from `config.model` (minus `name`), plain Python.

  `norm_layers` given as a string on the command line is read as "all", an int ("3")
  or a list of indices ("0,2,4" or "[0, 2, 4]").
  """
  kwargs = {k: _plain(v) for k, v in config.model.items() if k != "name"}
  if isinstance(kwargs.get("norm_layers"), str) and kwargs["norm_layers"] != "all":
    kwargs["norm_layers"] = _parse_layers(kwargs["norm_layers"])
  kwargs["norm_options"] = dict(kwargs.get("norm_options") or {})
  if not kwargs["norm_options"]:
    del kwargs["norm_options"]
  return kwargs


def _parse_layers(text: str) -> Any:
  parts = [p for p in text.strip().strip("[]()").replace(",", " ").split() if p]
  if not parts or not all(p.lstrip("-").isdigit() for p in parts):
    _fail("model.norm_layers", text, "'all', an int k (the first k) or a list like 0,2,4")
  if len(parts) == 1 and not text.strip().startswith(("[", "(")) and "," not in text:
    return int(parts[0])
  return tuple(int(p) for p in parts)


def _plain(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):   # unset fields (None) are left out
    return {k: v for k, v in value.to_dict().items() if v is not None}
  if isinstance(value, list):
    return tuple(value)
  return value


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field before any work; raises ConfigError (one line) on the first problem.
  Returns the config resolved against `base_config()` (`resolve_config`).

  Device-count checks (batch divisibility) happen in `check_batch_sizes` once JAX knows
  the devices.
  """
  config = resolve_config(config)
  _number(config, "seed", low=0, integer=True)
  _check_model(config)
  _check_data(config)
  _check_optimizer(config)
  _check_schedule_and_steps(config)
  try:   # the one check of config.probes (lipnorm.probes.options)
    validate_probe_options(dict(config.probes))
  except ValueError as e:
    raise ConfigError(_one_line(e)) from None
  _one_of(config, "distributed.mode", DISTRIBUTED_MODES)
  _number(config, "distributed.initialization_timeout_s", low=1, integer=True)
  return config


def _check_model(config) -> None:
  # Imported here: the registries live in modules that import JAX/Flax.
  from lipnorm.models import get_model, model_names
  from lipnorm.normalizers import get_normalizer, normalizer_names
  _one_of(config, "model.name", model_names())
  _one_of(config, "model.norm", normalizer_names())
  _one_of(config, "bn_stats", BN_STATS_SCOPES)
  _one_of(config, "dtype", DTYPES)
  norm_options = _plain(config.model.norm_options)
  try:
    get_normalizer(config.model.norm, **norm_options)
  except ValueError as e:
    raise ConfigError(f"config.model.norm_options={norm_options!r}: {e}") from None
  try:
    get_model(config.model.name, num_classes=2, **model_kwargs(config)).structure()
  except (ValueError, TypeError, ArithmeticError) as e:   # ArithmeticError: e.g. width=0
    raise model_error(config, e) from None


def _check_data(config) -> None:
  from lipnorm.data import dataset_names
  _one_of(config, "data.source", dataset_names())
  _number(config, "data.batch_size", low=1, integer=True)
  _number(config, "data.eval_batch_size", low=1, integer=True)
  if not isinstance(config.data.download, bool):
    _fail("data.download", config.data.download, "True or False")
  for key in ("data.num_train", "data.num_test"):
    if _get(config, key) is not None:
      _number(config, key, low=1, integer=True)


def _check_optimizer(config) -> None:
  from lipnorm.training.optim import optimizer_names
  _one_of(config, "optimizer.name", optimizer_names())
  _number(config, "optimizer.learning_rate", low=0, low_open=True)
  _number(config, "optimizer.momentum", low=0, high=1, high_open=True)
  _number(config, "optimizer.b1", low=0, high=1, high_open=True)
  _number(config, "optimizer.b2", low=0, high=1, high_open=True)
  _number(config, "optimizer.eps", low=0, low_open=True)
  _number(config, "optimizer.weight_decay", low=0)
  _number(config, "optimizer.grad_clip_norm", low=0)
  if not isinstance(config.optimizer.nesterov, bool):
    _fail("optimizer.nesterov", config.optimizer.nesterov, "True or False")
  _number(config, "label_smoothing", low=0, high=1, high_open=True)


def _check_schedule_and_steps(config) -> None:
  from lipnorm.training.optim import schedule_names
  _one_of(config, "schedule.name", schedule_names())
  _number(config, "schedule.warmup_steps", low=0, integer=True)
  _number(config, "schedule.final_lr_fraction", low=0, high=1)
  _number(config, "schedule.step_factor", low=0, low_open=True)
  bounds = list(config.schedule.step_boundaries)
  if any(not 0 < b < 1 for b in bounds) or bounds != sorted(bounds):
    _fail("schedule.step_boundaries", tuple(bounds), "increasing fractions in (0, 1)")
  if config.num_train_steps != -1:
    _number(config, "num_train_steps", low=1, integer=True)
  else:
    _number(config, "num_epochs", low=0, low_open=True)
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
              "keep_checkpoints"):
    _number(config, key, low=1, integer=True)
  if config.schedule.warmup_steps and config.num_train_steps != -1 and (
      config.schedule.warmup_steps >= config.num_train_steps):
    _fail("schedule.warmup_steps", config.schedule.warmup_steps,
          f"fewer than num_train_steps={config.num_train_steps}")


def model_error(config, error: BaseException) -> ConfigError:
  """The one-line ConfigError for a model `config.model` cannot build (naming its fields)."""
  fields = ", ".join(f"{k}={v!r}" for k, v in model_kwargs(config).items())
  kind = "" if isinstance(error, (ValueError, TypeError)) else f"{type(error).__name__}: "
  return ConfigError(f"config.model ({config.model.name}: {fields}): {kind}{_one_line(error)}")


def _one_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def check_batch_sizes(config, device_count: int, process_count: int) -> None:
  """Global batch sizes must split evenly over all devices (and so over processes)."""
  for key in ("data.batch_size", "data.eval_batch_size"):
    value = _get(config, key)
    if value % device_count:
      _fail(key, value, f"a multiple of the {device_count} devices "
            f"({process_count} process(es) x {device_count // process_count} local), "
            f"e.g. {max(device_count, value // device_count * device_count)}")
