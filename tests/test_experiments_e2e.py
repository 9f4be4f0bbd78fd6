"""Every experiment command end to end on the `tiny` presets (8x8 digits, a few steps)."""
import json
import math

import pytest

from lipnorm.experiments import cli, get_config
from lipnorm.experiments.regime import run_regime


def _png_ok(path):
  data = path.read_bytes()
  return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_sweep_tiny(tmp_path):
  out = tmp_path / "sweep"
  # At init only: the trained stage is the same train_and_load + measure as `compare`
  # (tested below) and every extra model costs ~10 s of compiles on 2 cores.
  assert cli.main(["sweep", "--preset", "tiny", "--out", str(out), "depths=(2, 3)",
                   "ks=(0, 2)", "train_steps=0"]) == 0
  s = json.loads((out / "sweep.json").read_text())
  for p in s["points"]:
    assert p["lip_x_max"] > 0 and p["bound"] >= p["lip_x_max"] * (1 - 1e-4), p
    # both bounds: the certified one sound (>= the local constant), never above the paper's
    assert p["lip_x_max"] * (1 - 1e-4) <= p["lip_bound_certified"] <= p["bound"] * (1 + 1e-6), p
  stages = {(p["series"], p["stage"]) for p in s["points"]}
  assert stages == {("depth", "init"), ("k", "init")}
  assert any(f["series"] == "depth" and f["metric"] == "lip_x_max" for f in s["fits"])
  for series in ("depth", "k"):
    assert {"bound", "lip_bound_certified"} <= {f["metric"] for f in s["fits"]
                                                if f["series"] == series}
  for p in s["permutation"]:     # C2: exactly a^L
    assert p["lip_x_max"] == pytest.approx(p["expected"], rel=1e-4)
    assert p["bound"] == pytest.approx(p["expected"], rel=1e-4)
  assert _png_ok(out / "sweep_depth.png") and _png_ok(out / "sweep_k.png")
  md = (out / "sweep.md").read_text()
  assert "| depth |" in md and "| paper bound | certified bound |" in md
  assert "| depth | init | batch | certified bound |" in md


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("compare")
  assert cli.main(["compare", "--preset", "tiny", "--out", str(out),
                   "norms=('none', 'batch')"]) == 0
  return out


@pytest.mark.slow
def test_compare_tiny(compare_dir):
  s = json.loads((compare_dir / "compare.json").read_text())
  assert [r["norm"] for r in s["rows"]] == ["none", "batch"]
  for r in s["rows"]:
    assert 0 <= r["test_accuracy"] <= 1 and r["lip_x_max"] > 0 and r["lip_theta_max"] > 0
    assert math.isfinite(r["hessian_top"]) and isinstance(r["diverged"], bool)
    assert r["lip_x_max"] * (1 - 1e-4) <= r["lip_bound_certified"] <= r["bound"] * (1 + 1e-6)
    # the plateau check: the run's evaluations at steps 3 and 6, and their difference
    (s3, a3), (s6, a6) = r["test_accuracy_curve"]
    assert (s3, s6) == (3, 6) and r["last_eval_change"] == pytest.approx(a6 - a3)
    assert a6 == pytest.approx(r["test_accuracy"], abs=1e-6)  # the same final net and split
  md = (compare_dir / "compare.md").read_text()
  assert md.count("\n| ") >= 3 and "Hessian" in md and "acc change, last eval" in md
  assert "| paper bound | certified bound |" in md
  assert _png_ok(compare_dir / "compare_metrics.png")
  assert _png_ok(compare_dir / "compare_curves.png")
  assert _png_ok(compare_dir / "runs" / "batch" / "dynamics" / "fig2_variances.png")


@pytest.mark.slow
def test_an_interrupted_run_stops_the_experiment(tmp_path, monkeypatch, capsys):
  """SIGTERM during one of an experiment's runs: that run checkpoints and stops, and the
  experiment stops with it (exit code 4, as train.py), measuring nothing and starting no
  further run; rerunning the same command resumes the run."""
  import os
  import signal

  from lipnorm.data import get_dataset
  from lipnorm.experiments import common
  real_train, started = common.train, []

  def interrupted_train(cfg, workdir, **kwargs):
    def dataset_fn(data_config, **kw):
      os.kill(os.getpid(), signal.SIGTERM)
      return get_dataset(data_config, **kw)
    started.append(workdir)
    return real_train(cfg, workdir, dataset_fn=dataset_fn, interactive=False, **kwargs)

  monkeypatch.setattr(common, "train", interrupted_train)
  out = tmp_path / "compare"
  assert cli.main(["compare", "--preset", "tiny", "--out", str(out),
                   "norms=('none', 'batch')"]) == 4
  err = capsys.readouterr().err.strip()
  assert err.startswith("interrupted: the run in") and "at step 1" in err
  assert "rerun the same command to resume" in err and "\n" not in err
  assert len(started) == 1 and sorted(p.name for p in (out / "runs").iterdir()) == ["none"]
  summary = json.loads((out / "runs" / "none" / "summary.json").read_text())
  assert summary["status"] == "preempted" and summary["step"] == 1
  assert not (out / "compare.json").exists()
  assert not (out / "runs" / "none" / "compare_row.json").exists()


@pytest.mark.slow
def test_compare_rerun_reuses_each_runs_stored_measurements(compare_dir, monkeypatch):
  from lipnorm.experiments import compare
  before = json.loads((compare_dir / "compare.json").read_text())

  def no_measuring(*a, **k):
    raise AssertionError("a finished, measured run was measured again")
  monkeypatch.setattr(compare, "_evaluate_run", no_measuring)
  assert cli.main(["compare", "--preset", "tiny", "--out", str(compare_dir),
                   "norms=('none', 'batch')"]) == 0
  assert json.loads((compare_dir / "compare.json").read_text())["rows"] == before["rows"]
  # other evaluation settings measure again
  with pytest.raises(AssertionError, match="measured again"):
    cli.main(["compare", "--preset", "tiny", "--out", str(compare_dir),
              "norms=('none',)", "num_examples=3"])


@pytest.mark.slow
def test_regime_tiny_reuses_compare(compare_dir, tmp_path):
  c = get_config("regime", "tiny")
  c.out_dir, c.compare_dir = str(tmp_path), str(compare_dir)
  c.construction.depths, c.construction.norms = (2, 4), ("batch",)
  c.normalizer_check.input_stds = (1.0,)
  s = run_regime(c)
  assert {e["norm"] for e in s["trained"]} == {"batch"}
  for e in s["trained"]:
    frac = e["eval"]["amplifying_fraction_per_layer"]
    assert len(frac) == 2 and all(0 <= f <= 1 for f in frac)
    assert 0 < e["lip_bound_certified"] <= e["bound"] * (1 + 1e-6)
  pts = s["construction"]["points"]
  assert all(p["amplifying_fraction"] == 1.0 for p in pts if p["norm"] != "none")
  for p in pts:
    assert p["lip_x_max"] * (1 - 1e-4) <= p["lip_bound_certified"] <= p["bound"] * (1 + 1e-6), p
  assert {"bound", "lip_bound_certified"} <= {f["metric"] for f in s["construction"]["fits"]}
  bn = {p["depth"]: p["lip_x_max"] for p in pts if p["norm"] == "batch"}
  none = {p["depth"]: p["lip_x_max"] for p in pts if p["norm"] == "none"}
  assert bn[4] > bn[2] > 1.0 > none[2] > none[4]       # amplifying vs contracting
  assert _png_ok(tmp_path / "regime_trained.png")
  assert _png_ok(tmp_path / "regime_construction.png")
  md = (tmp_path / "regime.md").read_text()
  assert "Construction" in md
  assert md.count("| paper bound | certified bound |") == 2     # trained and construction
  assert "| batch | certified bound |" in md
  for r in s["normalizer_check"]:   # C3: BN eval factor exact, the others upper bounds
    assert r["ratio_max"] <= 1 + 1e-5
    if r["norm"] in ("batch", "layer"):
      assert r["ratio_min"] >= 1 - 1e-5


@pytest.mark.slow
def test_dynamics_tiny_trains_then_plots(tmp_path):
  assert cli.main(["dynamics", "--preset", "tiny", "--out", str(tmp_path)]) == 0
  s = json.loads((tmp_path / "dynamics.json").read_text())
  assert s["weight_norm"] == "spectral" and s["steps"] == [0, 8]
  for name in ("fig1_weights.png", "fig2_variances.png", "fig3_selected_layers.png"):
    assert _png_ok(tmp_path / name)
