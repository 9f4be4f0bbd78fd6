"""E4: the amplifying regime of claim C7.

Part A (trained nets): for each normalized run of an E3 comparison (reused from
`compare_dir`, or trained here with the `compare` config), the fraction of normalizer
groups with sqrt(sigma^2 + eps) < |gamma| (per layer at the last probe, and over all
groups through training, in each logged BN mode), the normalizer factors, and the
measured Lipschitz constants of those nets.

Part B (construction, after the 2026 counter-paper): relu_nets with a normalizer on
every hidden layer, every kernel c * (semi-)orthogonal (||W_l||_2 = c <= 1), gamma = 1,
beta = 0, fed small-variance Gaussian inputs (std `input_scale`); BN running statistics
set to the batch statistics of those inputs. Every group amplifies, and the local input
and parameter Lipschitz constants are measured against depth (log-linear fit), next to
the unnormalized net with the same kernels (whose Lipschitz constant is <= c^L).

`seeds` (for part A) trains the comparison once per seed (`compare.seeds`); the table
then gives mean ± std over seeds of each normalizer's amplifying fraction and factors.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from lipnorm.experiments import common, plots, stats
from lipnorm.experiments import compare as compare_lib
from lipnorm.experiments.constructions import amplifying_variables
from lipnorm.experiments.fit import fit_growth
from lipnorm.experiments.records import first_key, read_records, series
from lipnorm.experiments.report import markdown_table
from lipnorm.models import get_model
from lipnorm.probes import LayerProber


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.out_dir = "runs/regime"
  c.compare_dir = ""              # an E3 output folder to reuse; empty: run `compare`
  c.compare = compare_lib.default_config()
  c.seeds = stats.seeds_field()   # part A: None = compare.seeds as given; else overrides it
  c.construction = ml_collections.ConfigDict()
  c.construction.enabled = True
  c.construction.norms = ("batch", "layer")
  c.construction.depths = (2, 4, 8, 16)
  c.construction.width = 64
  c.construction.in_dim = 64
  c.construction.weight_norm = 0.5       # c = ||W_l||_2 for every layer
  c.construction.input_scale = 0.01      # std of the Gaussian inputs
  c.construction.num_examples = 32
  c.construction.seed = 0
  c.normalizer_check = ml_collections.ConfigDict()   # C3: Jacobian norm vs factor
  c.normalizer_check.enabled = True
  c.normalizer_check.input_stds = (0.1, 1.0, 10.0)
  return c


def run_regime(config: ml_collections.ConfigDict) -> dict[str, Any]:
  c = config
  out = pathlib.Path(c.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  summary: dict[str, Any] = {"files": []}
  if c.compare_dir or c.compare.norms:
    summary["trained"] = _trained_part(c, out)
    summary["files"] += ["regime_trained.png"]
  if c.construction.enabled:
    summary["construction"] = _construction_part(c.construction, out)
    summary["files"] += ["regime_construction.png"]
  if c.normalizer_check.enabled:
    summary["normalizer_check"] = normalizer_check(tuple(c.normalizer_check.input_stds))
  summary["files"].append("regime.md")
  (out / "regime.json").write_text(json.dumps(summary, indent=1))
  (out / "regime.md").write_text(regime_markdown(summary, c))
  return summary


# ---------------------------------------------------------------- part A: trained nets

def _trained_part(c, out: pathlib.Path) -> list[dict]:
  if c.compare_dir:
    cmp_dir = pathlib.Path(c.compare_dir)
    path = cmp_dir / "compare.json"
    if not path.exists():
      raise ValueError(f"regime: compare_dir {str(cmp_dir)!r} has no compare.json "
                       "(run `python -m lipnorm.experiments compare` first)")
    rows = json.loads(path.read_text())["rows"]
  else:
    cc = c.compare.copy_and_resolve_references()
    cc.out_dir = str(out / "compare")
    if c.seeds:
      cc.seeds = c.seeds
    rows = compare_lib.run_compare(cc)["rows"]
  results = []
  fig, ax = plots.figure(2)
  per_layer, over_time, xs_t = {}, {}, {}
  for r in rows:
    if r["norm"] == "none":
      continue
    # runs live in <compare out_dir>/runs/<name>; resolve from compare_dir so a moved
    # or relatively-invoked comparison still works
    workdir = pathlib.Path(c.compare_dir) / "runs" / pathlib.Path(r["workdir"]).name \
        if c.compare_dir else pathlib.Path(r["workdir"])
    records = read_records(workdir)
    entry = {"norm": r["norm"], "seed": r.get("seed"), "lip_x_max": r.get("lip_x_max"),
             "lip_theta_max": r.get("lip_theta_max"), "bound": r.get("bound"),
             "lip_bound_certified": r.get("lip_bound_certified"),
             "test_accuracy": r.get("test_accuracy"), "diverged": r.get("diverged")}
    for mode in ("eval", "batch"):
      key = first_key(records, "probe", [f"{mode}/norm_amplifying_fraction"])
      if key is None:
        continue
      steps, frac = series(records, "probe", key)
      _, factor = series(records, "probe", f"{mode}/norm_factor")
      _, overall = series(records, "probe", f"{mode}/amplifying_fraction")
      entry[mode] = {"final_step": int(steps[-1]),
                     "amplifying_fraction_per_layer": frac[-1].tolist(),
                     "amplifying_fraction_overall": float(overall[-1]),
                     "layers_with_any_amplifying": int(np.sum(frac[-1] > 0)),
                     "factor_per_layer": factor[-1].tolist(),
                     "factor_min": float(np.nanmin(factor[-1])),
                     "factor_max": float(np.nanmax(factor[-1])),
                     "factor_product": float(np.nanprod(factor[-1]))}
      label = f"{r['norm']} ({mode})" if r.get("seed") is None or len(
          {x.get("seed") for x in rows}) == 1 else f"{r['norm']} s{r['seed']} ({mode})"
      per_layer[label] = frac[-1]
      xs_t[label], over_time[label] = steps, overall
    results.append(entry)
  plots.lines(ax[0], {k: np.arange(1, len(v) + 1) for k, v in per_layer.items()}, per_layer,
              title="amplifying groups per layer (end)", xlabel="normalizer l",
              ylabel="fraction sigma < |gamma|", log=False, markers=True)
  plots.lines(ax[1], xs_t, over_time, title="amplifying groups (all layers)",
              xlabel="step", ylabel="fraction sigma < |gamma|", log=False)
  plots.save(fig, out / "regime_trained.png")
  return results


# --------------------------------------------------------------- part B: construction

def _construction_part(cc, out: pathlib.Path) -> dict[str, Any]:
  key = jax.random.key(cc.seed)
  xs = cc.input_scale * jax.random.normal(jax.random.fold_in(key, 1),
                                          (cc.num_examples, cc.in_dim))
  points = []
  for norm in ("none", *cc.norms):
    for depth in cc.depths:
      model = get_model("relu_net", depth=depth, width=cc.width, norm=norm, num_classes=10)
      variables = common.init_variables(model, xs, seed=cc.seed)
      variables = amplifying_variables(model, variables, weight_norm=cc.weight_norm,
                                       key=jax.random.fold_in(key, 2))
      variables = common.fix_batch_stats(model, variables, xs)
      m = common.measure(model, variables, xs, bn_mode="eval", param=True)
      probes = LayerProber(model, spectral=False)(variables, xs)["eval"]
      frac = float(np.mean(probes.norm["amplifying_fraction"])) if norm != "none" else None
      points.append({"norm": norm, "depth": depth, "amplifying_fraction": frac, **m})
  fits = []
  for norm in ("none", *cc.norms):
    pts = [p for p in points if p["norm"] == norm]
    for metric in ("lip_x_max", "lip_theta_max", "bound", "lip_bound_certified"):
      f = fit_growth([p["depth"] for p in pts], [p.get(metric, np.nan) for p in pts])
      fits.append({"norm": norm, "metric": metric, "factor": f.factor, "r2": f.r2, "n": f.n})
  fig, ax = plots.figure(2)
  for i, metric in enumerate(("lip_x_max", "lip_theta_max")):
    xs_p = {n: [p["depth"] for p in points if p["norm"] == n] for n in ("none", *cc.norms)}
    ys_p = {n: np.array([p.get(metric, np.nan) for p in points if p["norm"] == n], float)
            for n in ("none", *cc.norms)}
    plots.lines(ax[i], xs_p, ys_p, title=f"{metric} of the construction "
                f"(||W||={cc.weight_norm}, input std {cc.input_scale})", xlabel="depth L",
                ylabel=metric, markers=True)
  plots.save(fig, out / "regime_construction.png")
  return {"points": points, "fits": fits, "config": cc.to_dict()}


# "bound" is the paper's bound; "lip_bound_certified" lipnorm's tightest certified bound.
_METRIC_NAMES = {"bound": "paper bound", "lip_bound_certified": "certified bound"}


# ------------------------------------------------------ part C: normalizer factors (C3)

def normalizer_check(scales=(0.1, 1.0, 10.0), n: int = 8, hw: int = 3, channels: int = 8,
                     seed: int = 0) -> list[dict]:
  """For each normalizer alone on `[n, hw, hw, channels]` inputs of std `scale` with random
  gammas: the exact local Jacobian norm of each example's map (float32 SVD of the
  autodiff Jacobian) divided by `lipschitz_factor(gamma, that example's sigma2, eps)`.
  BN is in eval mode with running statistics = this batch's, so its map is per example
  and the ratio must be 1; for LN/GN/IN/RMS the factor is an upper bound (ratio <= 1)."""
  from lipnorm.normalizers import NORM_STATS, get_normalizer, lipschitz_factor
  key = jax.random.key(seed)
  rows = []
  for kind in ("batch", "layer", "group", "instance", "rms"):
    opts = {"num_groups": 2} if kind == "group" else {}
    norm = get_normalizer(kind, **opts)()

    @jax.jit
    def jacobians(v, flat, norm=norm):
      """`[n, out, in]`: each example's output w.r.t. its own (flattened) input."""
      def one(u):
        return norm.apply(v, u.reshape(1, hw, hw, channels),
                          use_batch_stats=False).reshape(-1)
      return jax.vmap(jax.jacfwd(one))(flat)

    for scale in scales:
      x = scale * jax.random.normal(jax.random.fold_in(key, 1), (n, hw, hw, channels))
      v = norm.init(key, x, use_batch_stats=False)
      gamma = 1.0 + 0.5 * jax.random.normal(jax.random.fold_in(key, 2), (channels,))
      params = {**v["params"], "scale": gamma}
      v = {**v, "params": params}
      if kind == "batch":
        _, st = norm.apply(v, x, use_batch_stats=True, mutable=[NORM_STATS])
        s = st[NORM_STATS]
        v = {**v, "batch_stats": {"mean": s["mean"], "var": s["var"]}}
      _, st = norm.apply(v, x, use_batch_stats=False, mutable=[NORM_STATS])
      sigma2 = np.asarray(st[NORM_STATS]["sigma2"])
      jac = jacobians(v, x.reshape(n, -1))
      jnorms = np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)[:, 0]
      factors = [float(lipschitz_factor(gamma, sigma2 if kind == "batch" else sigma2[i],
                                        norm.epsilon)) for i in range(n)]
      ratios = jnorms / np.asarray(factors)
      rows.append({"norm": kind, "input_std": scale, "ratio_min": float(np.min(ratios)),
                   "ratio_max": float(np.max(ratios))})
  return rows


def regime_markdown(s: dict, c) -> str:
  parts = ["# E4: the amplifying regime (C7)\n",
           "A normalizer group amplifies when its divisor is below its gain: BN channel j "
           "when sqrt(sigma2_j + eps) < |gamma_j|; LN/GN/IN/RMS (sample n, group g) when "
           "sqrt(sigma2_ng + eps) < max_{j in g} |gamma_j|.\n"]
  if "trained" in s:
    flat = [{"norm": e["norm"], "mode": mode, "seed": e.get("seed"),
             "frac": e[mode]["amplifying_fraction_overall"],
             "layers_any": e[mode]["layers_with_any_amplifying"],
             "normalizers": len(e[mode]["factor_per_layer"]),
             "fmin": e[mode]["factor_min"], "fmax": e[mode]["factor_max"],
             "fprod": e[mode]["factor_product"], "lip": e.get("lip_x_max"),
             "paper": e.get("bound"), "certified": e.get("lip_bound_certified"),
             "acc": e.get("test_accuracy")}
            for e in s["trained"] for mode in ("eval", "batch") if mode in e]
    keys = ("frac", "layers_any", "normalizers", "fmin", "fmax", "fprod", "lip", "paper",
            "certified", "acc")
    agg = stats.aggregate(flat, ["norm", "mode"], keys)
    seeds = sorted({f["seed"] for f in flat if f["seed"] is not None})
    parts += ["## Trained networks (last probe)\n",
              (f"Mean ± std over seeds {seeds}.\n" if len(seeds) > 1 else ""),
              markdown_table(["norm", "BN mode", "amplifying fraction", "layers with any",
                              "normalizers", "factor min", "factor max", "factor product",
                              "Lip_x max", "paper bound", "certified bound", "test acc"],
                             [[a["norm"], a["mode"], *[stats.cell(a, k) for k in keys]]
                              for a in agg])]
  if "construction" in s:
    cc = s["construction"]
    parts += [f"\n## Construction: ||W_l||_2 = {c.construction.weight_norm}, gamma = 1, "
              f"input std {c.construction.input_scale}, width {c.construction.width}\n",
              markdown_table(["norm", "metric", "growth per layer", "R^2", "points"],
                             [[f["norm"], _METRIC_NAMES.get(f["metric"], f["metric"]),
                               f["factor"], f["r2"], f["n"]] for f in cc["fits"]]),
              "\n", markdown_table(
                  ["norm", "L", "amplifying fraction", "Lip_x max", "Lip_x mean",
                   "Lip_theta max", "paper bound", "certified bound"],
                  [[p["norm"], p["depth"], p["amplifying_fraction"], p.get("lip_x_max"),
                    p.get("lip_x_mean"), p.get("lip_theta_max"), p.get("bound"),
                    p.get("lip_bound_certified")]
                   for p in cc["points"]])]
  if "normalizer_check" in s:
    parts += ["\n## Normalizer Jacobian norm / factor (C3)\n",
              "Each normalizer alone, per example: exact local Jacobian norm divided by "
              "`max|gamma| / sqrt(sigma^2 + eps)` (BN eval: per-channel max, running stats = "
              "batch stats). 1 = the factor is attained; <= 1 = a valid upper bound.\n",
              markdown_table(["norm", "input std", "ratio min", "ratio max"],
                             [[r["norm"], r["input_std"], r["ratio_min"], r["ratio_max"]]
                              for r in s["normalizer_check"]])]
  return "\n".join(parts)
