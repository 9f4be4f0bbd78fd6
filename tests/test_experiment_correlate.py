"""E5 (`python -m lipnorm.experiments correlate`): the grid, the statistics and report on
synthetic records, and the tiny preset end to end (trains, measures, resumes)."""
import json
import math

import numpy as np
import pytest

from lipnorm.experiments import cli, correlate, get_config, stats
from lipnorm.experiments.evaluation import margins


def test_grid_products_dedups_and_canonicalizes():
  c = correlate.default_config()
  c.base.update(depth=3)
  c.blocks = ({"norm": ("none", "batch"), "depth": (3, 4)},
              {"norm": "batch", "k": (1, 2, 5)},          # k >= depth - 1 is "all"
              {"norm": "none", "k": (1, 2)})               # k means nothing: one net
  nets = correlate.grid(c)
  ids = [correlate.net_id(n) for n in nets]
  assert len(ids) == len(set(ids)) == 5
  assert {n["k"] for n in nets if n["norm"] == "none"} == {"all"}
  assert [n["k"] for n in nets if n["norm"] == "batch" and n["depth"] == 3] == ["all", 1]
  c.blocks = ({"model": "mlp"},)
  with pytest.raises(ValueError, match="allowed"):
    correlate.grid(c)
  c.blocks = ({"dropout": (0.1,)},)
  with pytest.raises(ValueError, match="unknown keys"):
    correlate.grid(c)
  assert len(correlate.grid(get_config("correlate", "cifar"))) >= 40
  small = correlate.grid(get_config("correlate", "cpu_small"))
  assert len(small) >= 40 and {n["model"] for n in small} == set(correlate.MODELS)
  for axis in ("depth", "width", "norm", "k", "lr", "wd", "batch"):   # every axis varies
    assert len({n[axis] for n in small}) >= 2, axis


def test_model_kwargs_cnn_widths_and_groups():
  kw = correlate.model_kwargs({"model": "cnn", "depth": 2, "width": 8, "norm": "group",
                               "k": "all"}, num_groups=4)
  assert kw == {"norm": "group", "norm_layers": "all", "norm_options": {"num_groups": 4},
                "convs_per_stage": 2, "widths": (8, 16, 32)}


def test_margins_hand_case():
  logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [np.nan, 0, 0]])
  m = margins(logits, np.array([0, 2, 0]))
  assert m[0] == 1.0 and m[1] == -2.0 and math.isnan(m[2])


def _synthetic_records():
  """8 nets on a depth x lr x norm grid whose gap is `measure_good` plus noise-free
  offsets, so tau(measure_good, gap) = 1 and tau(-measure_good, gap) = -1."""
  recs = []
  for depth in (2, 4):
    for lr in (0.01, 0.1):
      for norm in ("none", "batch"):
        good = depth + 10 * lr + (0.5 if norm == "batch" else 0.0)
        recs.append({"model": "relu_net", "depth": depth, "width": 8, "norm": norm,
                     "k": "all", "lr": lr, "wd": 0.0, "batch": 32, "gap": good / 10,
                     "gap_loss": good, "paper_bound": math.exp(good),
                     "lip_x_max": -good, "hessian_top": float("nan")})
  return recs


def test_correlations_tau_and_granulated():
  recs = _synthetic_records()
  axes = ("depth", "lr", "norm")
  rows = {(r["measure"], r["target"]): r for r in correlate.correlations(
      recs, axes, measures=("paper_bound", "lip_x_max", "hessian_top"))}
  pb = rows[("paper_bound", "gap")]
  assert pb["tau"] == pytest.approx(1.0) and pb["psi"] == pytest.approx(1.0)
  assert all(pb["granulated"][a] == {"tau": 1.0, "groups": 4} for a in axes)
  assert rows[("lip_x_max", "gap_loss")]["tau"] == pytest.approx(-1.0)
  h = rows[("hessian_top", "gap")]
  assert h["n"] == 0 and math.isnan(h["tau"]) and math.isnan(h["psi"])


@pytest.mark.slow
def test_report_and_scatter_from_records(tmp_path):
  recs = []
  for i, r in enumerate(_synthetic_records()):     # two seeds of each net
    for seed in (0, 1):
      recs.append({**r, "id": f"net{i}", "seed": seed, "steps": 100, "train_loss": 0.1,
                   "test_accuracy": 0.5, "gap": r["gap"] + 0.01 * seed})
  nets = correlate.per_net(recs)
  assert len(nets) == 8 and all(n["n_runs"] == 2 and n["seeds"] == [0, 1] for n in nets)
  assert nets[0]["gap_stats"]["std"] == pytest.approx(np.std([0.0, 0.01], ddof=1))
  corr = correlate.correlations(nets, ("depth",))
  s = {"num_nets": 8, "seeds": [0, 1], "target_loss": 0.05, "max_steps": 100,
       "axes": ["depth"], "num_reached_target": 0, "correlations": corr, "nets": nets}
  md = correlate.correlate_markdown(s)
  assert "| paper_bound | gap |" in md and " ± " in md
  correlate._scatter(nets, tmp_path)
  assert (tmp_path / "paper_bound.png").stat().st_size > 5000
  assert (tmp_path / "lip_x_max_over_margin.png").exists()


@pytest.mark.slow
def test_correlate_tiny_end_to_end_and_resume(tmp_path, monkeypatch):
  out = tmp_path / "e5"
  args = ["correlate", "--preset", "tiny", "--out", str(out),
          "blocks=({'norm': ('none', 'batch')}, {'depth': (2, 3)})",
          "max_steps=20", "chunk_steps=10"]
  assert cli.main(args) == 0
  s = json.loads((out / "correlate.json").read_text())
  assert s["num_nets"] == 3 and len(list((out / "nets").glob("*.json"))) == 3
  for n in s["nets"]:
    assert 0 <= n["test_accuracy"] <= 1 and n["steps"] in (10, 20)
    assert n["lip_x_max"] > 0 and n["paper_bound"] >= n["lip_x_max"] * (1 - 1e-4)
    assert n["product_bound"] > 0 and math.isfinite(n["hessian_top"])
    assert n["lip_x_max"] * (1 - 1e-4) <= n["certified_bound"] <= n["paper_bound"] * (1 + 1e-6)
    assert n["gap"] == pytest.approx(n["train_accuracy"] - n["test_accuracy"])
  rows = {(r["measure"], r["target"]): r for r in s["correlations"]}
  assert rows[("lip_x_max", "gap")]["n"] == 3
  assert rows[("lip_x_max", "gap")]["granulated"]["norm"]["groups"] == 1
  assert (out / "scatter" / "paper_bound.png").exists()
  md = (out / "correlate.md").read_text()
  assert "| lip_x_max | gap |" in md and "| certified_bound | gap |" in md
  assert "| paper bound | certified bound |" in md
  reached = sum(n["id"] not in {r["id"] for r in map(json.loads, map(
      lambda f: f.read_text(), (out / "nets").glob("*.json"))) if not r["reached_target"]}
      for n in s["nets"])
  assert s["num_nets_reached"] == reached
  assert all(r["n"] <= reached for r in s["correlations_reached"])
  assert not (out / "runs").exists() or not any((out / "runs").iterdir())

  def no_training(*a, **k):
    raise AssertionError("a finished net was retrained")
  monkeypatch.setattr(correlate.common, "train", no_training)   # every training path
  assert cli.main(args) == 0          # every net's JSON exists: nothing trains
  assert json.loads((out / "correlate.json").read_text())["nets"] == s["nets"]


def test_kendall_used_by_correlate_is_stats():
  assert correlate.stats.kendall_tau is stats.kendall_tau


def test_step_cap_per_model_is_validated_and_reported():
  c = get_config("correlate", "tiny")
  assert correlate.step_cap(c, "cnn") == correlate.step_cap(c, "relu_net") == 40
  c.max_steps_per_model = {"cnn": 70}
  assert correlate.step_cap(c, "cnn") == 70 and correlate.step_cap(c, "relu_net") == 40
  for bad in ({"mlp": 70}, {"cnn": 0}, {"cnn": 7.5}):
    c.max_steps_per_model = bad
    with pytest.raises(ValueError, match=r"max_steps_per_model=.*allowed: models"):
      correlate.run_correlate(c)
  s = {"num_nets": 0, "seeds": [0], "target_loss": 0.05, "max_steps": 600,
       "max_steps_per_model": {"cnn": 3000}, "axes": [], "num_reached_target": 0,
       "correlations": [], "nets": []}
  assert "0.05 or 600 steps (cnn: 3000)" in correlate.correlate_markdown(s)


def test_bound_measures_of_a_diverged_net_are_nan():
  import jax
  from lipnorm import models
  model = models.get_model("relu_net", num_classes=3, depth=2, width=4, norm="none")
  xs = jax.numpy.ones((2, 5))
  v = model.init(jax.random.PRNGKey(0), xs, train=False)
  v = jax.tree_util.tree_map(lambda a: a * np.nan, v)
  out = correlate.bound_measures(model, v, xs)
  assert set(out) == {*correlate.BOUND_FIELDS, "norm_factor_product"}
  assert all(math.isnan(x) for x in out.values())
