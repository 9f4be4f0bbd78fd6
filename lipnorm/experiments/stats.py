"""Statistics of the experiments: seed lists, mean / std / 95% interval over seeds,
"inside the noise" verdicts, Kendall's tau and the granulated tau of Jiang et al.
("Fantastic Generalization Measures and Where to Find Them", ICLR 2020).

Everything takes plain sequences of floats; NaN entries (a diverged run, a measurement
that does not exist for that net) are dropped and counted out of `n`.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable, Hashable, Iterable, Mapping, Optional, Sequence

import numpy as np
from ml_collections.config_dict import placeholder
from scipy import stats as _scipy_stats   # a dependency of jax; only t quantiles used

from lipnorm.experiments.report import fmt


def seeds_field():
  """The `seeds` config field of an experiment: unset (None: one run at the base seed),
  a count n or a list of seeds. Typed `object` because a tuple-typed field would parse
  the command-line `seeds=3` as the one-seed list (3,)."""
  return placeholder(object)


def seed_run_name(name: str, seed: int, seeds: Sequence[int], base_seed: int,
                  runs_dir: pathlib.Path) -> str:
  """The folder (under `runs_dir`) of the run `name` at `seed` in an experiment over
  `seeds`: `<name>` when the experiment is one run at the base seed (the one-seed
  layout), else `<name>_s<seed>`. So processes that split the seeds (`seeds=[1]`,
  `seeds=[2]`, one `--out`) never share a folder, and adding seeds to a one-seed
  experiment reuses its `<name>` run for the base seed instead of retraining it."""
  if list(seeds) == [base_seed]:
    return name
  tagged = f"{name}_s{seed}"
  if (seed == base_seed and not (runs_dir / tagged).exists()
      and (runs_dir / name).exists()):
    return name
  return tagged


def seed_list(seeds: Any, base_seed: int = 0) -> list[int]:
  """The seeds an experiment runs.

  `seeds` is None / () / 0 (one run at `base_seed`, the single-seed behaviour), a count
  n >= 1 (`base_seed, base_seed + 1, ..., base_seed + n - 1`) or a list of distinct ints.
  """
  if seeds is None or (isinstance(seeds, (tuple, list)) and len(seeds) == 0):
    return [int(base_seed)]
  if isinstance(seeds, bool):
    raise ValueError(f"seeds={seeds!r}: expected a count >= 1 or a list of ints")
  if isinstance(seeds, (int, np.integer)):
    if seeds == 0:
      return [int(base_seed)]
    if seeds < 0:
      raise ValueError(f"seeds={seeds!r}: a count must be >= 1 (or a list of ints)")
    return [int(base_seed) + i for i in range(int(seeds))]
  if isinstance(seeds, (tuple, list)) and all(
      isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds):
    out = [int(s) for s in seeds]
    if len(set(out)) != len(out):
      raise ValueError(f"seeds={tuple(seeds)!r}: seeds must be distinct")
    return out
  raise ValueError(f"seeds={seeds!r}: expected a count >= 1 or a list of ints")


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean, sample standard deviation (ddof 1; 0 for one value), half-width of the 95%
  Student-t interval of the mean (NaN for one value) and the number `n` of finite values
  (all NaN when n = 0)."""
  mean: float
  std: float
  ci95: float
  n: int

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)

  def text(self, digits: int = 4) -> str:
    """'m ± s' (std over seeds) or just 'm' for a single value; 'n/a' for none."""
    if self.n == 0:
      return "n/a"
    if self.n == 1:
      return fmt(self.mean, digits)
    return f"{fmt(self.mean, digits)} ± {fmt(self.std, 2)}"


def summarize(values: Iterable[Any]) -> Summary:
  v = np.array([_float(x) for x in values], np.float64)
  v = v[np.isfinite(v)]
  n = int(v.size)
  if n == 0:
    return Summary(math.nan, math.nan, math.nan, 0)
  mean = float(np.mean(v))
  if n == 1:
    return Summary(mean, 0.0, math.nan, 1)
  std = float(np.std(v, ddof=1))
  half = float(_scipy_stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
  return Summary(mean, std, half, n)


def _float(x: Any) -> float:
  if x is None or isinstance(x, str):
    return math.nan
  try:
    return float(x)
  except (TypeError, ValueError):
    return math.nan


def aggregate(rows: Sequence[Mapping[str, Any]], by: Sequence[str], keys: Sequence[str]
              ) -> list[dict[str, Any]]:
  """Groups `rows` by the values of `by` (first-seen order) and summarizes each of `keys`
  over the group: one dict per group with the `by` values, "n_runs", and for each key
  `key` (the mean, so single-seed readers keep working) and `key + "_stats"` (the
  `Summary` as a dict)."""
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault(tuple(r.get(b) for b in by), []).append(r)
  out = []
  for gkey, members in groups.items():
    entry: dict[str, Any] = dict(zip(by, gkey))
    entry["n_runs"] = len(members)
    for k in keys:
      s = summarize(m.get(k) for m in members)
      entry[k] = s.mean
      entry[k + "_stats"] = s.as_dict()
    out.append(entry)
  return out


def cell(entry: Mapping[str, Any], key: str, digits: int = 4) -> str:
  """The table cell of `key` in an `aggregate` entry: 'mean ± std' over seeds."""
  st = entry.get(key + "_stats")
  if st is None:
    return fmt(entry.get(key), digits)
  return Summary(**st).text(digits)


@dataclasses.dataclass(frozen=True)
class Difference:
  """Welch's two-sample comparison of means: `delta` = mean(a) - mean(b), its 95%
  interval, the two-sided p-value and `inside_noise` (True when the interval contains 0,
  None when either side has fewer than two values: no noise estimate)."""
  delta: float
  low: float
  high: float
  p_value: float
  inside_noise: Optional[bool]

  def text(self, what: str = "difference") -> str:
    if self.inside_noise is None:
      return f"{what} {fmt(self.delta)} (one seed: noise unknown)"
    verdict = "inside the seed noise" if self.inside_noise else "outside the seed noise"
    return (f"{what} {fmt(self.delta)} (95% interval [{fmt(self.low)}, {fmt(self.high)}], "
            f"p = {fmt(self.p_value, 2)}): {verdict}")


def difference(a: Iterable[Any], b: Iterable[Any]) -> Difference:
  sa, sb = summarize(a), summarize(b)
  delta = sa.mean - sb.mean
  if sa.n < 2 or sb.n < 2:
    return Difference(delta, math.nan, math.nan, math.nan, None)
  va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
  se = math.sqrt(va + vb)
  if se == 0:
    return Difference(delta, delta, delta, 0.0 if delta else 1.0, delta == 0)
  df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
  half = float(_scipy_stats.t.ppf(0.975, df)) * se
  p = float(2 * _scipy_stats.t.sf(abs(delta) / se, df))
  return Difference(delta, delta - half, delta + half, p, bool(abs(delta) <= half))


def kendall_tau(x: Sequence[Any], y: Sequence[Any]) -> float:
  """Kendall's tau-b of the paired values (pairs with a NaN dropped): (concordant -
  discordant) / sqrt((n0 - ties_x) (n0 - ties_y)) over all pairs; NaN when fewer than
  two pairs remain or either side is constant."""
  xv = np.array([_float(a) for a in x], np.float64)
  yv = np.array([_float(a) for a in y], np.float64)
  if xv.shape != yv.shape:
    raise ValueError(f"kendall_tau: x has {xv.size} values but y has {yv.size}")
  ok = np.isfinite(xv) & np.isfinite(yv)
  xv, yv = xv[ok], yv[ok]
  n = xv.size
  if n < 2:
    return math.nan
  i, j = np.triu_indices(n, 1)
  sx, sy = np.sign(xv[i] - xv[j]), np.sign(yv[i] - yv[j])
  s = float(np.sum(sx * sy))
  denom = math.sqrt(float(np.sum(sx != 0)) * float(np.sum(sy != 0)))
  return s / denom if denom > 0 else math.nan


def granulated_tau(records: Sequence[Mapping[str, Any]], measure: str, target: str,
                   axes: Sequence[str], *, fixed: Sequence[str] = (),
                   tau: Callable = kendall_tau) -> dict[str, Any]:
  """Jiang et al.'s granulated Kendall coefficient of `measure` against `target`.

  For each hyperparameter axis: the records are grouped by the values of every OTHER
  axis, so each group holds nets that differ only in that axis; tau is computed within
  each group of >= 2 nets (NaN groups, e.g. constant measure, skipped) and averaged.
  Keys in `fixed` (e.g. the architecture family) always split groups, without being
  an axis themselves.
  Psi = the mean of the per-axis averages over the axes that had a group.
  Returns {"axes": {axis: {"tau": mean, "groups": number used}}, "psi": Psi}.
  """
  per_axis = {}
  for axis in axes:
    others = [*fixed, *(a for a in axes if a != axis)]
    groups: dict[tuple, list] = {}
    for r in records:
      groups.setdefault(tuple(_hashable(r.get(a)) for a in others), []).append(r)
    taus = []
    for members in groups.values():
      if len({_hashable(m.get(axis)) for m in members}) < 2:
        continue
      t = tau([m.get(measure) for m in members], [m.get(target) for m in members])
      if math.isfinite(t):
        taus.append(t)
    per_axis[axis] = {"tau": float(np.mean(taus)) if taus else math.nan,
                      "groups": len(taus)}
  used = [v["tau"] for v in per_axis.values() if math.isfinite(v["tau"])]
  return {"axes": per_axis, "psi": float(np.mean(used)) if used else math.nan}


def _hashable(v: Any) -> Hashable:
  if isinstance(v, list):
    return tuple(_hashable(a) for a in v)
  if isinstance(v, dict):
    return tuple(sorted((k, _hashable(a)) for k, a in v.items()))
  return v
