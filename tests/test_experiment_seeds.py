"""The `seeds=` option of every experiment on the tiny presets: one run per seed, mean ±
std tables, bands and the inside-the-noise verdicts."""
import json

import pytest

from lipnorm.experiments import cli, get_config
from lipnorm.experiments.regime import run_regime


def _png_ok(path):
  data = path.read_bytes()
  return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_sweep_two_seeds_init(tmp_path):
  assert cli.main(["sweep", "--preset", "tiny", "--out", str(tmp_path), "depths=(2, 3)",
                   "ks=(0, 2)", "train_steps=0", "seeds=2"]) == 0
  s = json.loads((tmp_path / "sweep.json").read_text())
  assert s["seeds"] == [0, 1] and {p["seed"] for p in s["points"]} == {0, 1}
  by_seed = {}
  for p in s["points"]:
    by_seed.setdefault((p["series"], p["depth"], p["norm"], p["k"]), {})[p["seed"]] = \
        p["lip_x_max"]
  assert all(len(v) == 2 for v in by_seed.values())
  assert any(v[0] != v[1] for v in by_seed.values())     # different inits
  fit = next(f for f in s["fits"] if f["series"] == "depth" and f["metric"] == "lip_x_max"
             and f["norm"] == "none")
  per_seed = [f["factor"] for f in s["fits_per_seed"] if f["series"] == "depth"
              and f["metric"] == "lip_x_max" and f["norm"] == "none"]
  assert fit["factor_stats"]["n"] == 2
  assert fit["factor"] == pytest.approx(sum(per_seed) / 2)
  assert " ± " in (tmp_path / "sweep.md").read_text()
  assert _png_ok(tmp_path / "sweep_depth.png")


@pytest.mark.slow
def test_dynamics_two_seeds_bands(tmp_path):
  assert cli.main(["dynamics", "--preset", "tiny", "--out", str(tmp_path), "seeds=[3, 4]",
                   "train.num_train_steps=4"]) == 0
  s = json.loads((tmp_path / "dynamics.json").read_text())
  assert [w.rsplit("_", 1)[1] for w in s["workdirs"]] == ["s3", "s4"]
  assert s["overall"]["frac_variances_increased_stats"]["n"] == 2
  assert s["runs"][0]["weight_product"] != s["runs"][1]["weight_product"]
  assert _png_ok(tmp_path / "fig_seeds.png")
  assert _png_ok(tmp_path / "run_s3" / "fig2_variances.png")
  assert " ± " in (tmp_path / "dynamics.md").read_text()


@pytest.mark.slow
def test_compare_two_seeds_verdicts_and_regime(tmp_path):
  out = tmp_path / "cmp"
  assert cli.main(["compare", "--preset", "tiny", "--out", str(out),
                   "norms=('none', 'layer')", "seeds=2", "hessian=False",
                   "dynamics=False"]) == 0
  s = json.loads((out / "compare.json").read_text())
  assert [(r["norm"], r["seed"]) for r in s["rows"]] == [
      ("none", 0), ("none", 1), ("layer", 0), ("layer", 1)]
  agg = {a["norm"]: a for a in s["aggregate"]}
  accs = [r["test_accuracy"] for r in s["rows"] if r["norm"] == "layer"]
  assert agg["layer"]["test_accuracy"] == pytest.approx(sum(accs) / 2)
  assert agg["layer"]["test_accuracy_stats"]["n"] == 2
  v = {x["metric"]: x for x in s["verdicts"]}
  assert set(v) == {"test_accuracy", "gap"} and v["gap"]["reference"] == "none"
  assert isinstance(v["test_accuracy"]["inside_noise"], bool)
  assert v["test_accuracy"]["low"] <= v["test_accuracy"]["delta"] <= \
      v["test_accuracy"]["high"]
  md = (out / "compare.md").read_text()
  assert "Welch" in md and " ± " in md and "seed noise" in md
  assert _png_ok(out / "compare_metrics.png") and _png_ok(out / "compare_curves.png")

  c = get_config("regime", "tiny")
  c.out_dir, c.compare_dir = str(tmp_path / "regime"), str(out)
  c.construction.enabled = c.normalizer_check.enabled = False
  r = run_regime(c)
  assert sorted((e["norm"], e["seed"]) for e in r["trained"]) == [("layer", 0), ("layer", 1)]
  assert "Mean ± std over seeds [0, 1]" in (tmp_path / "regime" / "regime.md").read_text()
