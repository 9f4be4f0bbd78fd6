"""E1: Lip_x (local, bound) vs depth L and vs the number k of normalizers (claims C1, C5).

For a relu_net-style model (anything taking `depth=` and `norm_layers=`):
  * depth series: for each L in `depths`, the unnormalized net (k = 0) and the net with
    the chosen normalizer on every hidden layer (k = L - 1);
  * k series: depth `k_depth` with the normalizer on the first k hidden layers;
each measured at initialization and (if `train_steps > 0`) after a short training:
the local input Lipschitz constant ||J_x f(x)||_2 on a fixed data batch (max and mean
over the examples), the two sound upper bounds of the Lipschitz engine (the paper's
bound and lipnorm's tightest certified bound), the paper's product
with normalizers counted as 1 (prod ||W_l||_2) and the product of normalizer factors.
A log-linear fit gives the growth factor per layer (depth) or per normalizer (k).
Also (claim C2) the
exact construction with kernels a * P_l (permutations) measured against a^L.

At initialization BN running statistics are still (0, 1), so eval mode would not
normalize at all; for `bn_mode="eval"` they are first set to the batch statistics of
the measurement batch (`batch_fixed` semantics), so the measured map is the one the
network computes on that batch.

With several `seeds` every setting is initialized (and trained) once per seed; the
growth fits are made per seed and reported as mean ± std over seeds, the plots show the
mean with a ± std band.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from lipnorm.experiments import common, plots, stats
from lipnorm.experiments.constructions import scaled_permutation_variables
from lipnorm.experiments.fit import fit_growth
from lipnorm.experiments.report import markdown_table
from lipnorm.models import get_model

# "bound" is the paper's bound (product of layer norms and normalizer factors);
# "lip_bound_certified" is lipnorm's tightest certified bound (see
# lipnorm.probes.lipschitz_metrics.bounds); both are fitted and reported.
METRICS = ("lip_x_max", "lip_x_mean", "bound", "lip_bound_certified")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.out_dir = "runs/sweep"
  c.model_name = "relu_net"
  c.model = ml_collections.ConfigDict({"width": 128})   # other model kwargs
  c.norm = "batch"
  c.norm_options = ml_collections.ConfigDict()
  c.depths = (2, 4, 6, 8)
  c.k_depth = 8
  c.ks = (0, 1, 3, 5, 7)
  c.num_examples = 64         # examples of the measurement batch (train split)
  c.bn_mode = "eval"          # BN regime of the measured function (see module docstring)
  c.train_steps = 0           # 0: at initialization only
  c.train = common.train_config()   # data, optimizer, ... of the short training
  c.seeds = stats.seeds_field()   # None = train.seed only; a count n or a list of seeds
  # C2: relu_nets with kernels a * P_l (permutations, width below, no bias) on positive
  # inputs, where Lip_x = a^L exactly; one depth series per scale a.
  c.permutation_scales = (1.5,)
  c.permutation_width = 16
  return c


def _settings(c) -> list[tuple[str, int, str, int]]:
  """(series, depth, norm, k) in run order, both series, duplicates included."""
  out = []
  for depth in c.depths:
    out.append(("depth", depth, "none", 0))
    if c.norm != "none":
      out.append(("depth", depth, c.norm, depth - 1))
  for k in c.ks:
    out.append(("k", c.k_depth, c.norm if k > 0 else "none", k))
  return out


def run_sweep(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Writes sweep_depth.png, sweep_k.png, sweep.md, sweep.json to `config.out_dir`."""
  c = config
  if not c.depths or min(c.depths) < 2:
    raise ValueError(f"sweep: depths={tuple(c.depths)!r} must be non-empty, each >= 2")
  if any(not 0 <= k <= c.k_depth - 1 for k in c.ks):
    raise ValueError(f"sweep: ks={tuple(c.ks)!r} must lie in [0, k_depth - 1 = "
                     f"{c.k_depth - 1}]")
  seeds = stats.seed_list(c.seeds, c.train.seed)
  out = pathlib.Path(c.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  data = common.load_data(c.train, c.num_examples)
  points, fits_per_seed = [], []
  for seed in seeds:
    measured: dict[tuple, list[dict]] = {}
    seed_points = []
    for series, depth, norm, k in _settings(c):
      key = (depth, norm, k)
      if key not in measured:
        name = stats.seed_run_name(f"L{depth}_{norm}_k{k}", seed, seeds, c.train.seed,
                                   out / "runs")
        measured[key] = _measure_setting(c, data, depth, norm, k, out / "runs" / name, seed)
      for m in measured[key]:
        seed_points.append({"series": series, "depth": depth, "norm": norm, "k": k,
                            "seed": seed, **m})
    points += seed_points
    fits_per_seed += [{**f, "seed": seed} for f in _fits(seed_points)]
  fits = stats.aggregate(fits_per_seed, ["series", "stage", "norm", "metric"],
                         ["factor", "r2", "n"])
  exact = _permutation_series(c)
  summary = {"norm": c.norm, "bn_mode": c.bn_mode, "seeds": seeds, "points": points,
             "fits": fits, "fits_per_seed": fits_per_seed, "permutation": exact,
             "files": ["sweep_depth.png", "sweep_k.png", "sweep.md"]}
  _plot(points, c, out)
  (out / "sweep.json").write_text(json.dumps(summary, indent=1))
  (out / "sweep.md").write_text(sweep_markdown(summary))
  return summary


def _measure_setting(c, data, depth: int, norm: str, k: int, workdir: pathlib.Path,
                     seed: int) -> list[dict]:
  """The init (and, with `c.train_steps`, trained: run in `workdir`) measurements."""
  model_kwargs = {**c.model.to_dict(), "depth": depth, "norm": norm, "norm_layers": k}
  if norm != "none" and c.norm_options:
    model_kwargs["norm_options"] = c.norm_options.to_dict()
  model = common.build_model(c.model_name, data.num_classes, model_kwargs)
  variables = common.init_variables(model, data.images, seed=seed)
  if c.bn_mode == "eval":   # running stats (0, 1) at init: use the batch's statistics
    variables = common.fix_batch_stats(model, variables, data.images)
  results = [{"stage": "init", **common.measure(model, variables, data.images,
                                                 bn_mode=c.bn_mode, param=False)}]
  if c.train_steps > 0:
    tcfg = common.with_model(c.train, c.model_name, model_kwargs)
    tcfg.num_train_steps = int(c.train_steps)
    tcfg.seed = seed
    run = common.train_and_load(tcfg, workdir)
    results.append({"stage": "trained", "diverged": run.diverged,
                    **common.measure(run.model, run.variables, data.images,
                                     bn_mode=c.bn_mode, param=False)})
  return results


def _permutation_series(c) -> list[dict]:
  """Measured Lip_x and bound of the a * P_l construction against a^L, per scale a."""
  out = []
  key = jax.random.key(0)
  xs = jax.random.uniform(key, (8, c.permutation_width), minval=0.1, maxval=1.0)
  for a in c.permutation_scales:
    for depth in c.depths:
      model = get_model("relu_net", depth=depth, width=c.permutation_width, norm="none",
                        use_bias=False, num_classes=c.permutation_width)
      variables = common.init_variables(model, xs, seed=0)
      variables = scaled_permutation_variables(model, variables, scale=a,
                                               key=jax.random.fold_in(key, depth))
      m = common.measure(model, variables, xs, param=False)
      out.append({"scale": a, "depth": depth, "expected": a ** depth,
                  "lip_x_max": m["lip_x_max"], "lip_x_mean": m["lip_x_mean"],
                  "bound": m["bound"], "lip_bound_certified": m["lip_bound_certified"]})
    pts = [p for p in out if p["scale"] == a]
    f = fit_growth([p["depth"] for p in pts], [p["lip_x_max"] for p in pts])
    for p in pts:
      p["fitted_factor"] = f.factor
  return out


def _select(points, series, stage, norm=None):
  return [p for p in points if p["series"] == series and p["stage"] == stage
          and (norm is None or p["norm"] == norm)]


def _fits(points) -> list[dict]:
  fits = []
  for stage in ("init", "trained"):
    for norm in sorted({p["norm"] for p in _select(points, "depth", stage)}):
      pts = _select(points, "depth", stage, norm)
      for metric in METRICS + ("product_bound",):
        f = fit_growth([p["depth"] for p in pts], [p.get(metric, np.nan) for p in pts])
        fits.append({"series": "depth", "stage": stage, "norm": norm, "metric": metric,
                     "factor": f.factor, "r2": f.r2, "n": f.n})
    pts = _select(points, "k", stage)
    for metric in METRICS + ("norm_factor_product",):
      f = fit_growth([p["k"] for p in pts], [p.get(metric, np.nan) for p in pts])
      fits.append({"series": "k", "stage": stage, "norm": "first k", "metric": metric,
                   "factor": f.factor, "r2": f.r2, "n": f.n})
  return [f for f in fits if f["n"] > 0]


def _plot(points, c, out: pathlib.Path) -> None:
  """Mean over seeds (line) with a ± std band (several seeds)."""
  stages = [s for s in ("init", "trained") if any(p["stage"] == s for p in points)]
  seeds = sorted({p.get("seed", 0) for p in points})
  for series, xkey, xlabel in (("depth", "depth", "depth L"),
                               ("k", "k", f"normalizers k (depth {c.k_depth})")):
    fig, ax = plots.figure(len(stages))
    for i, stage in enumerate(stages):
      samples, xs, colors = {}, {}, {}
      norms = sorted({p["norm"] for p in _select(points, series, stage)})
      groups = [(n, _select(points, series, stage, n)) for n in norms] if series == "depth" \
          else [(c.norm, _select(points, series, stage))]
      for norm, pts in groups:
        for metric, name in (("lip_x_max", "local max"), ("bound", "paper bound"),
                             ("lip_bound_certified", "certified bound")):
          label = f"{norm}: {name}"
          runs = []
          for seed in seeds:
            sp = sorted((p for p in pts if p.get("seed", 0) == seed), key=lambda p: p[xkey])
            xs[label] = [p[xkey] for p in sp]
            runs.append(np.array([p.get(metric, np.nan) for p in sp], np.float64))
          samples[label] = runs
          colors[label] = plots.color_for(norm, ("none", c.norm))
      plots.bands(ax[i], xs, samples, title=f"Lip_x vs {series} ({stage})", xlabel=xlabel,
                  ylabel="Lipschitz constant", markers=True, colors=colors,
                  styles={label: (":" if label.endswith("certified bound") else "--")
                          if label.endswith("bound") else "-" for label in samples})
    plots.save(fig, out / f"sweep_{series}.png")


_METRIC_NAMES = {"bound": "paper bound", "lip_bound_certified": "certified bound"}


def sweep_markdown(s: dict) -> str:
  seeds = s.get("seeds", [0])
  keys = ("lip_x_max", "lip_x_mean", "bound", "lip_bound_certified", "product_bound",
          "norm_factor_product")
  agg = stats.aggregate(s["points"], ["series", "depth", "norm", "k", "stage"], keys)
  rows = [[a["series"], a["depth"], a["norm"], a["k"], a["stage"],
           *[stats.cell(a, k) for k in keys]] for a in agg]
  fit_rows = [[f["series"], f["stage"], f["norm"], _METRIC_NAMES.get(f["metric"], f["metric"]),
               stats.cell(f, "factor"),
               stats.cell(f, "r2"), f["n"]] for f in s["fits"]]
  over = f" (mean ± std over seeds {seeds}: one fit per seed)" if len(seeds) > 1 else ""
  return (f"# E1 sweep: normalizer `{s['norm']}`, BN mode `{s['bn_mode']}`\n\n"
          "Growth factor per layer (depth series) or per normalizer (k series) from a "
          f"log-linear least-squares fit{over}:\n\n"
          + markdown_table(["series", "stage", "norm", "metric", "factor", "R^2", "points"],
                           fit_rows)
          + "\n## Exact construction (C2): kernels a * P_l, positive inputs, Lip_x = a^L\n\n"
          + markdown_table(["a", "L", "a^L", "Lip_x max", "Lip_x mean", "paper bound",
                            "certified bound", "fitted factor"],
                           [[p["scale"], p["depth"], p["expected"], p["lip_x_max"],
                             p["lip_x_mean"], p["bound"], p.get("lip_bound_certified", np.nan),
                             p["fitted_factor"]]
                            for p in s["permutation"]])
          + "\n## All points\n\n"
          + markdown_table(["series", "L", "norm", "k", "stage", "Lip_x max", "Lip_x mean",
                            "paper bound", "certified bound", "product bound (norms as 1)",
                            "prod norm factors"], rows))
