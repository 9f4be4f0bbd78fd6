"""Experiment outputs built from JSONL logs and arrays (no training): growth fits,
record parsing, E2 figures, CLI overrides."""
import json
import math

import jax
import numpy as np
import pytest

from lipnorm.experiments import cli, get_config
from lipnorm.experiments.dynamics import run_dynamics
from lipnorm.experiments.fit import fit_growth
from lipnorm.experiments.records import read_records, series
from lipnorm.models import get_model
from lipnorm.probes import LayerProber, flatten_probes


def test_fit_growth_recovers_factor_and_ignores_bad_points():
  x = np.arange(1, 9)
  y = 3.0 * 1.7 ** x
  fit = fit_growth(x, np.where(x == 4, np.nan, y))
  assert fit.factor == pytest.approx(1.7, rel=1e-9) and fit.n == 7
  assert fit.r2 == pytest.approx(1.0) and fit.predict([10])[0] == pytest.approx(3 * 1.7 ** 10)
  assert math.isnan(fit_growth([1, 2], [1.0, -1.0]).factor)
  with pytest.raises(ValueError, match="points"):
    fit_growth([1, 2, 3], [1, 2])


def _write_fake_run(tmp_path, norm):
  """A JSONL log whose probe lines are real `flatten_probes` outputs of a net whose
  weights grow over the 'steps' (kernels scaled by 1 + step/10)."""
  model = get_model("relu_net", depth=4, width=8, norm=norm)
  x = jax.random.normal(jax.random.key(1), (32, 6))
  variables = model.init(jax.random.key(0), x)
  prober = LayerProber(model, bn_modes=("eval", "batch"), spectral=False)
  lines = []
  for step in (0, 10, 20, 30):
    scaled = jax.tree_util.tree_map_with_path(
        lambda p, a: a * (1 + step / 10) if p[-1].key == "kernel" else a, variables)
    lines.append({"step": step, "kind": "train", "loss": 1.0 / (step + 1),
                  "accuracy": step / 40})
    lines.append({"step": step, "kind": "probe", **flatten_probes(prober(scaled, x))})
  lines.append({"step": 30, "kind": "eval", "accuracy": 0.5})
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
  return path


@pytest.mark.parametrize("norm", ["none", "batch"])
@pytest.mark.slow
def test_dynamics_writes_figures_and_summary(tmp_path, norm):
  _write_fake_run(tmp_path, norm)
  records = read_records(tmp_path)
  steps, w = series(records, "probe", "weight_frobenius")
  assert steps.tolist() == [0, 10, 20, 30] and w.shape == (4, 4)
  np.testing.assert_allclose(w[-1] / w[0], 4.0, rtol=1e-5)
  config = get_config("dynamics")
  config.workdir, config.out_dir = str(tmp_path), str(tmp_path / "out")
  summary = run_dynamics(config)
  for name in ("fig1_weights.png", "fig2_variances.png", "fig3_selected_layers.png"):
    assert (tmp_path / "out" / name).stat().st_size > 5000
  assert summary["weight_norm"] == "frobenius"          # no spectral norms were logged
  assert summary["weight_product"][1] / summary["weight_product"][0] == pytest.approx(4 ** 4,
                                                                                       rel=1e-4)
  assert summary["frac_weight_norms_increased"] == 1.0
  if norm == "none":   # unnormalized: variances of the 3 hidden pre-activations grow by 16
    assert "pre-activation" in summary["variance_source"]
    var_rows = [r for r in summary["layers"] if r["quantity"] == "sigma^2"]
    assert len(var_rows) == 3
    np.testing.assert_allclose([r["ratio"] for r in var_rows], 4.0 ** (2 * np.arange(1, 4)),
                               rtol=1e-3)
  else:
    assert "batch mode" in summary["variance_source"]
  md = (tmp_path / "out" / "dynamics.md").read_text()
  assert "| sigma^2 | 1 |" in md


def test_cli_overrides_and_errors(capsys):
  config = get_config("dynamics")
  cli.apply_overrides(config, ["max_layers=3", "title=hello", "bn_mode=eval"])
  assert config.max_layers == 3 and config.title == "hello"
  with pytest.raises(ValueError, match="no such config key .nope."):
    cli.apply_overrides(config, ["nope=1"])
  with pytest.raises(ValueError, match="key=value"):
    cli.apply_overrides(config, ["max_layers"])
  with pytest.raises(ValueError, match="valid presets"):
    get_config("dynamics", "nope")
  with pytest.raises(ValueError, match="valid names"):
    get_config("nope")
  assert cli.main(["dynamics", "--print-config", "max_layers=4"]) == 0
  assert "max_layers: 4" in capsys.readouterr().out
