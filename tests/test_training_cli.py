"""train.py and the experiments CLI as a user runs them: --help exits 0; every bad input
is one `error:` line and exit code 2; nested overrides (`--config.model.norm_options.*`)
work; rerunning a completed run returns its summary and changes nothing."""
import importlib
import json
import subprocess
import sys

import pytest

import lipnorm.probes
import lipnorm.training
from lipnorm.experiments import cli
from lipnorm.training import train
from training_helpers import CONFIGS, ROOT, finish, launch_train_py, tiny_cli_flags, tiny_config



def _start(*flags: str) -> subprocess.Popen:
  return launch_train_py(flags)


def _result(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
  return finish(proc, timeout)


def _train_py(*flags: str, timeout: float = 240) -> tuple[int, str, str]:
  return _result(_start(*flags), timeout)


def _one_error_line(code: int, out: str, err: str) -> str:
  assert code == 2, (out, err)
  assert "Traceback" not in out + err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


def test_help_exits_0():
  code, out, err = _train_py("--help")
  assert code == 0, err
  assert "Exit codes" in out and "model.norm_options.num_groups" in out


def test_flag_checks_load_without_jax():
  # --help and the flag parsing need only these modules; the packages' lazy exports keep
  # JAX, Flax and Orbax out of them (--help: ~0.15 s instead of ~2 s of start-up).
  code = ("import sys, lipnorm.training.config_schema, lipnorm.training.overrides, "
          "lipnorm.probes.options; "
          "heavy = sorted({'jax', 'flax', 'optax', 'orbax.checkpoint'} & set(sys.modules)); "
          "assert not heavy, heavy")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr


def test_package_exports_resolve_lazily():
  for pkg in (lipnorm.training, lipnorm.probes):
    for name in pkg.__all__:
      module = importlib.import_module(f"{pkg.__name__}.{pkg._EXPORTS[name]}")
      assert getattr(pkg, name) is getattr(module, name)
    assert set(pkg.__all__) <= set(dir(pkg))
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
      getattr(pkg, "no_such_name")
  assert lipnorm.training.steps.__name__ == "lipnorm.training.steps"   # submodules too


@pytest.mark.slow
def test_bad_flags_are_one_line_exit_2(tmp_path):
  (tmp_path / "afile").write_text("x")
  default = f"--config={CONFIGS / 'default.py'}"
  cases = [
      ((f"--workdir={tmp_path / 'w'}",), r"--config"),                    # missing --config
      ((default, f"--workdir={tmp_path / 'w'}", "--config.num_train_steps=abc"),
       "num_train_steps=abc"),                                             # not an int
      ((default, f"--workdir={tmp_path / 'w'}", "--config.model.norm_options.num_groupz=8"),
       "error: --config.model.norm_options.num_groupz=8: no such config key 'num_groupz'; "
       "did you mean 'num_groups'? (all fields: lipnorm/training/config_schema.py)"),
      ((default, f"--workdir={tmp_path / 'afile'}"), "is not a directory"),
      ((default, f"--workdir={tmp_path / 'w'}", "--config.model.norm=group",
        "--config.model.norm_options.num_groups=5"), "num_groups=5 does not divide"),
  ]
  procs = [_start(*flags) for flags, _ in cases]   # independent: run them side by side
  for (flags, expected), proc in zip(cases, procs):
    line = _one_error_line(*_result(proc))
    assert expected in line, (flags, line)
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_nested_override_trains_and_a_rerun_changes_nothing(tmp_path):
  changes = {"model.norm": "group", "bn_stats": "global", "num_train_steps": 2}
  flags = tiny_cli_flags(**changes) + [
      "--config.model.norm_options.num_groups=8", f"--workdir={tmp_path}"]
  code, out, err = _train_py(*flags)
  assert code == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["status"] == "completed" and summary["step"] == 2
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["model"]["norm_options"]["num_groups"] == 8
  # Rerunning the completed run (the same config, built in-process: a second train.py
  # would only repeat the start-up) returns the stored summary and changes no file.
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  config = tiny_config(**changes, **{"model.norm_options.num_groups": 8})
  assert train(config, str(tmp_path), interactive=False) == summary
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_experiments_cli_errors_and_override_syntax(capsys):
  assert cli.main(["compare", "--preset", "tiny", "bogus_key=1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: --config.bogus_key=1: no such config key 'bogus_key'; valid keys: "
                 "bn_mode, dynamics, hessian, hessian_examples, norm_options, norms, num_eval, "
                 "num_examples, out_dir, seeds, train"]
  assert cli.main(["compare", "--preset", "tiny", "--config.num_eval=abc"]) == 2
  assert "num_eval=abc" in capsys.readouterr().err
  # train.py's syntax, nested into the training config, and the old bare form together.
  assert cli.main(["compare", "--preset", "tiny", "--print-config",
                   "--config.train.model.norm_options.num_groups=2", "num_eval=50"]) == 0
  config = cli.get_config("compare", "tiny")
  cli.apply_overrides(config, ["--config.train.model.norm_options.num_groups=2",
                               "num_eval=50", "--config.norms=('none', 'batch')"])
  assert config.train.model.norm_options.num_groups == 2 and config.num_eval == 50
  assert config.norms == ("none", "batch")
