"""lipnorm.experiments.stats against hand-computed cases and scipy."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lipnorm.experiments import stats


def test_seed_list_forms_and_errors():
  assert stats.seed_list(None, 7) == [7] and stats.seed_list((), 7) == [7]
  assert stats.seed_list(0, 3) == [3]
  assert stats.seed_list(3, 10) == [10, 11, 12]
  assert stats.seed_list([4, 1], 0) == [4, 1]
  for bad in (-1, [1, 1], "three", [1.5], True):
    with pytest.raises(ValueError, match="seeds"):
      stats.seed_list(bad)


def test_summarize_mean_std_and_t_interval():
  s = stats.summarize([1.0, 2.0, 3.0, float("nan"), None])
  assert s.n == 3 and s.mean == pytest.approx(2.0) and s.std == pytest.approx(1.0)
  # t_{0.975, 2} = 4.302653 (table value); half-width = t * s / sqrt(n)
  assert s.ci95 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
  assert s.text() == "2 ± 1"
  one = stats.summarize([5.0])
  assert one.n == 1 and one.std == 0 and math.isnan(one.ci95) and one.text() == "5"
  assert stats.summarize([]).text() == "n/a"


def test_aggregate_groups_and_cells():
  rows = [{"norm": "none", "acc": 0.5}, {"norm": "batch", "acc": 0.6},
          {"norm": "none", "acc": 0.7}, {"norm": "batch", "acc": float("nan")}]
  agg = stats.aggregate(rows, ["norm"], ["acc"])
  assert [a["norm"] for a in agg] == ["none", "batch"]
  assert agg[0]["acc"] == pytest.approx(0.6) and agg[0]["n_runs"] == 2
  assert agg[0]["acc_stats"]["std"] == pytest.approx(math.sqrt(0.02))
  assert agg[1]["acc_stats"]["n"] == 1
  assert stats.cell(agg[0], "acc") == "0.6 ± 0.14" and stats.cell(agg[1], "acc") == "0.6"


def test_difference_welch_matches_scipy_and_flags_noise():
  a, b = [0.50, 0.52, 0.51], [0.60, 0.61, 0.63]
  d = stats.difference(a, b)
  ref = scipy_stats.ttest_ind(a, b, equal_var=False)
  assert d.p_value == pytest.approx(ref.pvalue, rel=1e-9)
  assert d.delta == pytest.approx(np.mean(a) - np.mean(b)) and d.inside_noise is False
  near = stats.difference([0.50, 0.55, 0.45], [0.51, 0.47, 0.56])
  assert near.inside_noise is True and near.low < 0 < near.high
  assert stats.difference([0.5], [0.6, 0.7]).inside_noise is None
  assert "one seed" in stats.difference([0.5], [0.6]).text()


def test_kendall_tau_hand_cases_and_scipy():
  # one discordant pair of six: (5 - 1) / 6
  assert stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
  # a tie in x: S = 2 over sqrt(2 * 3) untied pairs (tau-b)
  assert stats.kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
  assert stats.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert stats.kendall_tau([1, 2, float("nan"), 3], [1, 2, 0, 3]) == pytest.approx(1.0)
  assert math.isnan(stats.kendall_tau([1, 1, 1], [1, 2, 3]))
  assert math.isnan(stats.kendall_tau([1], [2]))
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 5, 40), rng.normal(size=40) + rng.integers(0, 5, 40)
  assert stats.kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic,
                                                  rel=1e-12)
  with pytest.raises(ValueError, match="values"):
    stats.kendall_tau([1, 2], [1, 2, 3])


def test_granulated_tau_hand_case():
  # axes lr (2 values) x depth (2 values); the measure tracks the gap along lr in both
  # depth groups (tau +1 each), and against it along depth in both lr groups (tau -1).
  recs = [{"lr": 0.1, "depth": 2, "m": 1.0, "gap": 0.1},
          {"lr": 0.2, "depth": 2, "m": 2.0, "gap": 0.2},
          {"lr": 0.1, "depth": 4, "m": 0.5, "gap": 0.3},
          {"lr": 0.2, "depth": 4, "m": 0.9, "gap": 0.4}]
  g = stats.granulated_tau(recs, "m", "gap", ["lr", "depth"])
  assert g["axes"]["lr"] == {"tau": 1.0, "groups": 2}
  assert g["axes"]["depth"] == {"tau": -1.0, "groups": 2}
  assert g["psi"] == pytest.approx(0.0)
  # an axis that never varies alone has no group
  g = stats.granulated_tau(recs[:1] + recs[3:], "m", "gap", ["lr", "depth"])
  assert g["axes"]["lr"]["groups"] == 0 and math.isnan(g["psi"])


def test_seed_run_name_separates_seeds_and_reuses_a_one_seed_run(tmp_path):
  name = lambda seed, seeds: stats.seed_run_name("batch", seed, seeds, 0, tmp_path)  # noqa: E731
  assert name(0, [0]) == "batch"                  # one run at the base seed
  assert name(1, [1]) == "batch_s1"               # a process given only seed 1
  assert [name(s, [0, 1]) for s in (0, 1)] == ["batch_s0", "batch_s1"]
  (tmp_path / "batch").mkdir()                    # a one-seed experiment ran before:
  assert [name(s, [0, 1]) for s in (0, 1)] == ["batch", "batch_s1"]   # reuse its run
  (tmp_path / "batch_s0").mkdir()                 # ... unless seed 0 has its own folder
  assert name(0, [0, 1]) == "batch_s0"
  assert stats.seed_run_name("batch", 5, [5], 5, tmp_path) == "batch"
