"""Config checks (each bad input gives one line naming key, value and what is allowed),
optimizer / schedule registries against their formulas, small helpers."""
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lipnorm.training import ConfigError, base_config, make_optimizer, make_schedule, train
from lipnorm.training.config_schema import check_batch_sizes, model_kwargs, validate_config
from lipnorm.training.distributed import cluster_requested
from lipnorm.training.metrics_writer import MetricsWriter, read_metrics, to_json_value
from training_helpers import set_fields, tiny_config


def _config(**changes):
  return set_fields(base_config(), {"model.depth": 3, "model.width": 8, **changes})


def _error(config) -> str:
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  message = str(info.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("key,value,expected", [
    ("optimizer.name", "adamx", r"config.optimizer.name='adamx'.*allowed: adam, adamw, sgd"),
    ("model.norm", "batchh", r"config.model.norm='batchh'.*allowed: batch, group, instance, "
                             r"layer, none, rms"),
    ("model.name", "resnet1000", r"config.model.name='resnet1000'.*allowed:.*relu_net"),
    ("optimizer.learning_rate", -0.1, r"config.optimizer.learning_rate=-0.1.*> 0"),
    ("optimizer.learning_rate", 0.0, r"learning_rate=0.0.*> 0"),
    ("schedule.name", "linear", r"schedule.name='linear'.*allowed: constant, cosine, step"),
    ("bn_stats", "local", r"bn_stats='local'.*allowed: global, per_device"),
    ("dtype", "float16", r"dtype='float16'.*allowed: float32, bfloat16"),
    ("label_smoothing", 1.0, r"label_smoothing=1.0.*< 1"),
    ("optimizer.momentum", 1.5, r"optimizer.momentum=1.5"),
    ("num_train_steps", 0, r"num_train_steps=0.*>= 1"),
    ("data.batch_size", 0, r"data.batch_size=0"),
    ("schedule.step_boundaries", (0.75, 0.5), r"step_boundaries=\(0.75, 0.5\).*increasing"),
    ("distributed.mode", "yes", r"distributed.mode='yes'.*allowed: auto, on, off"),
    ("log_every_steps", 0, r"log_every_steps=0"),
])
def test_bad_values_name_key_value_and_allowed(key, value, expected):
  message = _error(_config(**{key: value}))
  assert re.search(expected, message), message


def test_unknown_keys_are_caught_by_the_lock():
  c = _config()
  with pytest.raises(AttributeError, match="momemtum"):   # base_config() is locked
    c.optimizer.momemtum = 0.5
  c.model.widht = 8                                  # model keys go to get_model
  assert "widht" in _error(c) and "width" in _error(c)
  # A config built some other way (here from a dict) is merged into the locked defaults.
  raw = _config().to_dict()
  raw["optimizer"]["momemtum"] = 0.5
  message = _error(ml_collections.ConfigDict(raw))
  assert "config.optimizer.momemtum=0.5" in message
  assert "valid keys in config.optimizer:" in message and "momentum" in message
  raw = _config().to_dict()
  raw["warmup"] = 5
  assert "config.warmup=5" in _error(ml_collections.ConfigDict(raw))


def test_defaults_fill_a_partial_config():
  resolved = validate_config(ml_collections.ConfigDict({"model": {"depth": 3, "width": 8},
                                                        "optimizer": {"name": "adam"}}))
  assert resolved.optimizer.name == "adam" and resolved.optimizer.b2 == 0.999
  assert resolved.model.name == "relu_net" and resolved.model.depth == 3


def test_model_and_normalizer_options_are_checked():
  assert "norm_layers=12" in _error(_config(**{"model.norm": "batch", "model.norm_layers": 12}))
  c = _config(**{"model.norm": "batch"})
  c.model.norm_options.num_groups = 4
  assert "num_groups" in _error(c) and "allowed" in _error(c)
  c = _config(**{"model.norm": "batch"})
  with pytest.raises(AttributeError, match="axis_name"):   # set by bn_stats, not by hand
    c.model.norm_options.axis_name = "batch"
  c = _config(**{"model.norm": "group", "model.width": 8})
  c.model.norm_options.num_groups = 4                 # unset options stay out of the model
  assert model_kwargs(c)["norm_options"] == {"num_groups": 4}
  validate_config(c)
  assert "norm_options" not in model_kwargs(_config())


def test_impossible_model_shapes_are_config_errors(tmp_path):
  # width 0 passes the structural check; building the parameters fails. Still one line,
  # a ConfigError, before the workdir holds anything.
  with pytest.raises(ConfigError) as info:
    train(tiny_config(**{"model.width": 0}), str(tmp_path / "w"), interactive=False)
  message = str(info.value)
  assert "\n" not in message and "config.model (relu_net" in message and "width=0" in message
  assert not (tmp_path / "w").exists()


def test_norm_layers_from_command_line_strings():
  for text, expected in (("2", 2), ("0,1", (0, 1)), ("[1]", (1,)), ("all", "all")):
    c = _config(**{"model.norm": "batch"})
    c.model.norm_layers = text
    assert model_kwargs(c)["norm_layers"] == expected
    validate_config(c)


def test_batch_size_must_divide_over_devices(tmp_path):
  def never(*args, **kwargs):
    raise AssertionError("the dataset must not be built for a bad config")
  c = _config(**{"data.batch_size": 10})
  with pytest.raises(ConfigError, match=r"data.batch_size=10.*multiple of the 4 devices"):
    train(c, str(tmp_path), dataset_fn=never)
  with pytest.raises(ConfigError, match=r"eval_batch_size=6.*multiple of the 8 devices "
                                        r"\(2 process\(es\) x 4 local\)"):
    check_batch_sizes(_config(**{"data.batch_size": 8, "data.eval_batch_size": 6}), 8, 2)
  assert not (tmp_path / "config.json").exists()


def test_schedules_match_formulas():
  c = _config(**{"optimizer.learning_rate": 0.4, "schedule.name": "cosine",
                 "schedule.final_lr_fraction": 0.1})
  s = make_schedule(c, 100)
  for t in (0, 30, 100):
    expect = 0.4 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t / 100)))
    np.testing.assert_allclose(float(s(t)), expect, rtol=1e-6)
  c.schedule.warmup_steps = 10
  s = make_schedule(c, 100)
  np.testing.assert_allclose([float(s(t)) for t in (0, 5, 10)], [0.0, 0.2, 0.4], rtol=1e-6)
  np.testing.assert_allclose(float(s(55)), 0.4 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 2))),
                             rtol=1e-6)
  c = _config(**{"optimizer.learning_rate": 1.0, "schedule.name": "step",
                 "schedule.step_boundaries": (0.5, 0.75), "schedule.step_factor": 0.1})
  s = make_schedule(c, 100)
  np.testing.assert_allclose([float(s(t)) for t in (49, 50, 74, 75, 99)],
                             [1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
  assert float(make_schedule(_config(**{"schedule.name": "constant"}), 100)(77)) == 0.1
  # With num_epochs the step count is known only here: a warmup as long as the run fails.
  with pytest.raises(ConfigError, match=r"warmup_steps=100 .*fewer than the run's 100"):
    make_schedule(_config(**{"schedule.warmup_steps": 100}), 100)


def _one_update(config, params, grads):
  tx = make_optimizer(config, 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_optimizer_updates_match_formulas():
  w, g = jnp.array([1.0, -2.0, 3.0]), jnp.array([0.5, 0.5, -1.0])
  base = {"optimizer.learning_rate": 0.1, "schedule.name": "constant"}
  # sgd with coupled L2: w - lr * (g + wd * w)   (first momentum step = the gradient)
  out = _one_update(_config(**base, **{"optimizer.weight_decay": 0.01}), w, g)
  np.testing.assert_allclose(out, w - 0.1 * (g + 0.01 * w), rtol=1e-6)
  # adam's first step is lr * sign(g) (bias-corrected m / sqrt(v)), up to eps
  out = _one_update(_config(**base, **{"optimizer.name": "adam"}), w, g)
  np.testing.assert_allclose(out, w - 0.1 * np.sign(g), rtol=1e-5)
  # adamw decays decoupled: w - lr * (sign(g) + wd * w)
  out = _one_update(_config(**base, **{"optimizer.name": "adamw",
                                       "optimizer.weight_decay": 0.01}), w, g)
  np.testing.assert_allclose(out, w - 0.1 * (np.sign(g) + 0.01 * w), rtol=1e-5)
  # clipping by global norm: |g| = 1.5 -> scaled to norm 0.3
  out = _one_update(_config(**base, **{"optimizer.grad_clip_norm": 0.3,
                                       "optimizer.momentum": 0.0}), w, g)
  np.testing.assert_allclose(out, w - 0.1 * g * (0.3 / np.linalg.norm(g)), rtol=1e-5)
  # nesterov: first step is lr * (1 + momentum) * g
  out = _one_update(_config(**base, **{"optimizer.nesterov": True}), w, g)
  np.testing.assert_allclose(out, w - 0.1 * 1.9 * g, rtol=1e-6)


def test_cluster_detection_from_environment(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    monkeypatch.delenv(var, raising=False)
  d = base_config().distributed
  assert not cluster_requested(d)
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not cluster_requested(d)                      # a one-task SLURM job
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert cluster_requested(d)
  monkeypatch.delenv("SLURM_JOB_ID")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0")
  assert not cluster_requested(d)                      # a single-host TPU VM
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1,t2,t3")
  assert cluster_requested(d)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  d.coordinator_address = "10.0.0.1:1234"
  assert cluster_requested(d)


def test_metrics_writer_json_and_resume_truncation(tmp_path):
  assert to_json_value({"a": np.float32(np.nan), "b": np.arange(3), "c": jnp.inf}) == {
      "a": None, "b": [0, 1, 2], "c": None}
  w = MetricsWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3):
    w.write(step, "train", {"loss": float(step), "per_layer": [step, 2 * step]})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "ki')                           # torn by a kill
  assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3]
  w = MetricsWriter(str(tmp_path), enabled=True, resume_step=2)
  w.write(3, "eval", {"loss": 0.5})
  w.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [(r["step"], r["kind"]) for r in map(json.loads, lines)] == [
      (1, "train"), (2, "train"), (3, "eval")]
  off = MetricsWriter(str(tmp_path / "other"), enabled=False)
  assert off.write(1, "train", {"loss": 1.0})["loss"] == 1.0
  assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("path", ["configs/default.py", "configs/relu10_cifar10.py",
                                  "configs/resnet18_cifar10.py",
                                  "configs/efficientnet_b3_cifar10.py"])
def test_config_files_list_every_model_option_and_build_the_same_model(path):
  from lipnorm.models import get_model, model_options
  from lipnorm.training.config_schema import load_config_file
  config = load_config_file(path)
  options = model_options(config.model.name)
  assert set(options) <= set(config.model.keys())
  kwargs = model_kwargs(config)
  listed = get_model(config.model.name, num_classes=10, **kwargs)
  only_set = {k: v for k, v in kwargs.items() if k not in options or v != options[k]}
  assert listed == get_model(config.model.name, num_classes=10, **only_set)


def test_set_model_replaces_the_previous_models_options_and_keeps_the_normalizer():
  from lipnorm.models import get_model, model_options
  from lipnorm.training.config_schema import load_config_file, set_model
  config = load_config_file("configs/relu10_cifar10.py")
  config.model.norm = "group"
  config.model.norm_options.num_groups = 4
  set_model(config, "cnn", widths=(8, 16))
  assert set(config.model.keys()) == set(model_options("cnn")) | {"name", "norm",
                                                                  "norm_options"}
  model = get_model("cnn", num_classes=10, **model_kwargs(config))
  assert model.widths == (8, 16) and model.norm.name == "group"
  assert dict(model.norm.options) == {"num_groups": 4}


def test_every_model_option_can_be_overridden_from_the_command_line():
  from lipnorm.models import get_model
  from lipnorm.training.config_schema import load_config_file
  from lipnorm.training.overrides import apply_overrides
  config = apply_overrides(load_config_file("configs/resnet18_cifar10.py"), [
      "--config.model.width=16", "--config.model.conv_impl=matmul",
      "--config.model.stage_sizes=(1, 1, 1, 1)", "--config.model.norm_layers=3"])
  model = get_model(config.model.name, num_classes=10, **model_kwargs(config))
  assert (model.width, model.conv_impl, model.stage_sizes) == (16, "matmul", (1, 1, 1, 1))
  assert model.norm.layers == 3
  with pytest.raises(ValueError, match="no such config key 'widht'.*did you mean 'width'"):
    apply_overrides(load_config_file("configs/resnet18_cifar10.py"),
                    ["--config.model.widht=16"])


def test_workdirs_written_before_model_options_were_listed_still_match():
  from lipnorm.training.config_schema import load_config_file
  from lipnorm.training.workdir import config_as_dict, config_differences
  new = config_as_dict(load_config_file("configs/resnet18_cifar10.py"))
  old = json.loads(json.dumps(new))
  for key in ("width", "stage_sizes", "conv_impl", "stem", "norm_layers"):
    del old["model"][key]            # a config.json of an earlier lipnorm
  assert config_differences(old, new) == []
  new["model"]["width"] = 16
  assert config_differences(old, new) == ["model.width: 64 -> 16"]   # 64: the default
