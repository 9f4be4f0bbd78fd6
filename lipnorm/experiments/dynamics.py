"""E2: the paper's Figures 1-3 from a training workdir's JSONL log (claims C4, C5).

Figure 1: per-layer weight norms, their product, training accuracy over steps.
Figure 2: per-layer input variances (of each normalizer, or before each activation in
          an unnormalized net) and their cumulative product over layers, over steps.
Figure 3: weight norms and input variances of a few selected layers.
Also writes `dynamics.md` / `dynamics.json` with first/last values and ratios.

Several seeds (`seeds`, training each into `<workdir>_s<seed>`; or several existing
`workdirs`): each run gets its own figures in `<out_dir>/<run name>/`, and `out_dir`
gets fig_seeds.png (the weight-norm product and the cumulative variance product over
steps, mean ± std band over runs) and dynamics.md / dynamics.json with every summary
number and every layer's last/first ratio as mean ± std over runs.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections
import numpy as np

from lipnorm.experiments import common, plots, stats
from lipnorm.experiments.fit import fit_growth
from lipnorm.experiments.records import first_key, has_key, read_records, series
from lipnorm.training.run_log import ACCURACY


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = ""            # training workdir holding the JSONL log
  c.train_enabled = False   # first train `train` into `workdir` (default <out_dir>/run)
  c.train = common.train_config()
  c.out_dir = ""            # where figures go (default: <workdir>/dynamics)
  c.max_layers = 11         # the seed shows the first 11 layers for ResNet18
  c.bn_mode = "batch"       # preferred BN mode of the variances (falls back to eval)
  c.weight_norm = "auto"    # spectral | frobenius | auto (spectral if logged at >= 3 steps)
  c.select_layers = 6       # Figure 3: this many evenly spaced layers
  c.title = ""
  c.seeds = stats.seeds_field()   # with train_enabled: None = train.seed only; a count or a list
  c.workdirs = ()           # or: several existing workdirs (e.g. seeds) to aggregate
  return c


def variance_series(records: list[dict], bn_mode: str = "batch"
                    ) -> tuple[np.ndarray, np.ndarray, str]:
  """(steps, per-layer input variance `[T, L]`, description).

  Normalized nets: the mean over groups of each normalizer's input variance (BN mode
  `bn_mode` when logged, else eval). Unnormalized nets: the mean per-unit variance of
  each hidden layer's pre-activation (every linear map but the last, the logits).
  """
  for mode in dict.fromkeys((bn_mode, "eval", "batch")):
    key = f"{mode}/norm_var_mean"
    if first_key(records, "probe", [key]):
      steps, v = series(records, "probe", key)
      if v.ndim == 2 and v.shape[1] > 0:
        return steps, v, f"normalizer input variance ({mode} mode)"
  key = first_key(records, "probe", ["eval/preact_var_mean", "batch/preact_var_mean"])
  if key is None:
    raise ValueError("no probe records with input variances (were probes enabled?)")
  steps, v = series(records, "probe", key)
  return steps, v[:, :-1], "pre-activation variance before each activation"


def _layer_table(name: str, values: np.ndarray, first: int = 0) -> list[dict]:
  rows = []
  for j in range(values.shape[1]):
    col = values[:, j]
    ok = np.flatnonzero(np.isfinite(col))
    if ok.size == 0:
      continue
    a, b = col[ok[0]], col[ok[-1]]
    rows.append({"quantity": name, "layer": first + j + 1, "first": float(a),
                 "last": float(b), "ratio": float(b / a) if a else float("nan")})
  return rows


def _select(n: int, k: int) -> list[int]:
  return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))


def run_dynamics(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Writes fig1_weights.png, fig2_variances.png, fig3_selected_layers.png, dynamics.md,
  dynamics.json to `config.out_dir` (several seeds / workdirs: see the module
  docstring); returns the summary dict."""
  seeds = stats.seed_list(config.seeds, config.train.seed)
  if config.workdirs and config.train_enabled:
    raise ValueError("dynamics: workdirs (existing runs) and train_enabled exclude "
                     "each other")
  if len(config.workdirs) > 1 or (config.train_enabled and len(seeds) > 1):
    return _run_several(config, seeds)
  if config.workdirs:
    config.workdir = config.workdirs[0]
  if config.train_enabled:
    config.train.seed = seeds[0]
  return _run_one(config)


def _run_several(config: ml_collections.ConfigDict, seeds: list[int]) -> dict[str, Any]:
  if config.train_enabled:
    base = config.workdir or str(pathlib.Path(config.out_dir) / "run")
    workdirs = [f"{base}_s{s}" for s in seeds]
  else:
    workdirs = list(config.workdirs)
  if not config.out_dir:
    raise ValueError("dynamics: several runs need out_dir")
  out = pathlib.Path(config.out_dir)
  runs = []
  for i, wd in enumerate(workdirs):
    c = config.copy_and_resolve_references()
    c.workdirs, c.seeds, c.workdir = (), (), wd
    c.out_dir = str(out / pathlib.Path(wd).name)
    if config.train_enabled:
      c.train.seed = seeds[i]
    c.title = f"{config.title or pathlib.Path(wd).name}"
    runs.append(_run_one(c))
  return _aggregate_runs(runs, config, out)


SCALARS = ("frac_weight_norms_increased", "frac_variances_increased",
           "variance_cumprod_growth_per_layer_final", "variance_cumprod_fit_r2_final")


def _aggregate_runs(runs: list[dict], config, out: pathlib.Path) -> dict[str, Any]:
  rows = []
  for r in runs:
    flat = {k: r[k] for k in SCALARS}
    flat["weight_product_ratio"] = r["weight_product"][1] / r["weight_product"][0]
    flat["variance_cumprod_ratio"] = (r["variance_cumprod_last_layer"][1]
                                      / r["variance_cumprod_last_layer"][0])
    rows.append(flat)
  keys = [*SCALARS, "weight_product_ratio", "variance_cumprod_ratio"]
  overall = stats.aggregate([{**r, "all": 1} for r in rows], ["all"], keys)[0]
  layers = stats.aggregate([row for r in runs for row in r["layers"]],
                           ["quantity", "layer"], ["first", "last", "ratio"])
  # bands over runs: a run that stopped early (diverged) is cut to the common steps
  samples: dict[str, list] = {"weight norm product": [], "variance cumprod (all layers)": []}
  xs: dict[str, np.ndarray] = {}
  curves = [r["curves"] for r in runs]
  for label, skey, vkey in (("weight norm product", "weight_steps", "weight_product"),
                            ("variance cumprod (all layers)", "variance_steps",
                             "variance_cumprod")):
    n = min(len(cv[skey]) for cv in curves)
    xs[label] = np.asarray(curves[0][skey][:n])
    samples[label] = [np.asarray(cv[vkey][:n]) for cv in curves]
  fig, ax = plots.figure(2)
  for i, label in enumerate(samples):
    plots.bands(ax[i], {label: xs[label]}, {label: samples[label]},
                title=f"{config.title or 'runs'}: {label} ({len(runs)} runs)", xlabel="step",
                ylabel=label)
  plots.save(fig, out / "fig_seeds.png")
  summary = {"workdirs": [r["workdir"] for r in runs], "runs": runs, "overall": overall,
             "layers": layers, "files": ["fig_seeds.png", "dynamics.md"]}
  (out / "dynamics.json").write_text(json.dumps(summary, indent=1))
  lines = [f"# Training dynamics over {len(runs)} runs (mean ± std)", "",
           *[f"- {r['workdir']}" for r in runs], "",
           "| quantity | value |", "|---|---|",
           *[f"| {k} | {stats.cell(overall, k)} |" for k in keys], "",
           "| quantity | layer | first | last | last/first |", "|---|---|---|---|---|",
           *[f"| {a['quantity']} | {a['layer']} | {stats.cell(a, 'first')} | "
             f"{stats.cell(a, 'last')} | {stats.cell(a, 'ratio')} |" for a in layers]]
  (out / "dynamics.md").write_text("\n".join(lines) + "\n")
  return summary


def _check_and_train(config: ml_collections.ConfigDict) -> None:
  """Validates `config` and, with `train_enabled`, trains (or resumes) its workdir."""
  if config.train_enabled:
    if not (config.workdir or config.out_dir):
      raise ValueError("dynamics: train_enabled needs workdir or out_dir")
    config.workdir = config.workdir or str(pathlib.Path(config.out_dir) / "run")
    if not config.train.probes.enabled:
      raise ValueError("dynamics: train.probes.enabled must be True (the figures are "
                       "made of probe records)")
    common.train_run(config.train, config.workdir)
  if not config.workdir:
    raise ValueError("dynamics: config.workdir (a training workdir) is required, or "
                     "train_enabled=True")
  if config.weight_norm not in ("auto", "spectral", "frobenius"):
    raise ValueError(f"dynamics: weight_norm={config.weight_norm!r}; allowed: auto, "
                     f"spectral, frobenius")


def _weight_series(records, weight_norm: str, workdir: str):
  """(steps [T], norms [T, L], "spectral" | "frobenius"): spectral norms for "auto" when
  at least 3 probes have them, else Frobenius."""
  wanted = weight_norm
  if wanted == "auto":
    spectral_steps = {r["step"] for r in records
                      if r.get("kind") == "probe" and "weight_spectral" in r}
    wanted = "spectral" if len(spectral_steps) >= 3 else "frobenius"
  wkey = first_key(records, "probe", [f"weight_{wanted}", "weight_frobenius"])
  if wkey is None:
    raise ValueError(f"{workdir}: no probe records with weight norms")
  wsteps, wnorms = series(records, "probe", wkey)
  return wsteps, wnorms, wkey.split("_", 1)[1]


def _fig1_weights(path, records, title, wsteps, wnorms, which, m):
  """Figure 1: weight norm per layer, their product over all layers, accuracy."""
  fig, ax = plots.figure(3)
  plots.layer_lines(ax[0], wsteps, wnorms[:, :m], title=f"{title}: {which} norm per layer",
                    ylabel=f"||W_l|| ({which})")
  plots.lines(ax[1], wsteps, {"product": np.prod(wnorms, axis=1)},
              title="product of all weight norms", xlabel="step", ylabel="prod_l ||W_l||")
  acc = {kind: series(records, kind, ACCURACY) for kind in ("train", "eval")
         if has_key(records, kind, ACCURACY)}   # the run log's one accuracy key
  plots.lines(ax[2], {k: v[0] for k, v in acc.items()}, {k: v[1] for k, v in acc.items()},
              title="accuracy", xlabel="step", ylabel="accuracy", log=False,
              styles={"eval": "o--"})
  return plots.save(fig, path)


def _fig2_variances(path, title, vsteps, variances, cum, m):
  """Figure 2: input variance per layer, its cumulative product over layers in time and
  against depth at a few steps."""
  fig, ax = plots.figure(3)
  plots.layer_lines(ax[0], vsteps, variances[:, :m], title=f"{title}: input variance",
                    ylabel="sigma^2 (mean over groups)")
  plots.layer_lines(ax[1], vsteps, cum[:, :m], title="cumulative product over layers",
                    ylabel="prod_{i<=l} sigma_i^2", labels=[f"<= {j + 1}" for j in
                                                            range(min(m, cum.shape[1]))])
  shown = _select(len(vsteps), 5)
  plots.lines(ax[2], np.arange(1, cum.shape[1] + 1),
              {f"step {vsteps[i]}": cum[i] for i in shown},
              title="cumulative product vs depth", xlabel="layer l", ylabel="prod sigma^2",
              markers=True)
  return plots.save(fig, path)


def _fig3_selected(path, title, wsteps, wnorms, which, vsteps, variances, n_select):
  """Figure 3: weight norms and input variances of a few evenly spread layers."""
  sel_w = _select(wnorms.shape[1], n_select)
  sel_v = _select(variances.shape[1], n_select)
  fig, ax = plots.figure(2)
  plots.layer_lines(ax[0], wsteps, wnorms[:, sel_w], title=f"{title}: weight norms",
                    ylabel=f"||W_l|| ({which})", labels=[f"layer {j + 1}" for j in sel_w])
  plots.layer_lines(ax[1], vsteps, variances[:, sel_v], title="input variances",
                    ylabel="sigma^2", labels=[f"layer {j + 1}" for j in sel_v])
  return plots.save(fig, path)


def _run_one(config: ml_collections.ConfigDict) -> dict[str, Any]:
  _check_and_train(config)
  out = pathlib.Path(config.out_dir or pathlib.Path(config.workdir) / "dynamics")
  out.mkdir(parents=True, exist_ok=True)
  records = read_records(config.workdir)
  title = config.title or pathlib.Path(config.workdir).name
  wsteps, wnorms, which = _weight_series(records, config.weight_norm, config.workdir)
  product = np.prod(wnorms, axis=1)           # over all layers, not only those shown
  vsteps, variances, vdesc = variance_series(records, config.bn_mode)
  cum = np.cumprod(variances, axis=1)
  m = config.max_layers
  files = [_fig1_weights(out / "fig1_weights.png", records, title, wsteps, wnorms, which, m),
           _fig2_variances(out / "fig2_variances.png", title, vsteps, variances, cum, m),
           _fig3_selected(out / "fig3_selected_layers.png", title, wsteps, wnorms, which,
                          vsteps, variances, config.select_layers)]
  final_fit = fit_growth(np.arange(1, cum.shape[1] + 1), cum[-1])
  rows = _layer_table(f"‖W‖ {which}", wnorms) + _layer_table("sigma^2", variances)
  summary = {
      "workdir": str(config.workdir), "variance_source": vdesc, "weight_norm": which,
      "steps": [int(wsteps[0]), int(wsteps[-1])],
      "weight_product": [float(product[0]), float(product[-1])],
      "variance_cumprod_last_layer": [float(cum[0, -1]), float(cum[-1, -1])],
      "frac_weight_norms_increased": float(np.mean(wnorms[-1] > wnorms[0])),
      "frac_variances_increased": float(np.mean(variances[-1] > variances[0])),
      "variance_cumprod_growth_per_layer_final": final_fit.factor,
      "variance_cumprod_fit_r2_final": final_fit.r2,
      "layers": rows, "files": [f.name for f in files],
      "curves": {"weight_steps": wsteps.tolist(), "weight_product": product.tolist(),
                 "variance_steps": vsteps.tolist(), "variance_cumprod": cum[:, -1].tolist()},
  }
  (out / "dynamics.json").write_text(json.dumps(summary, indent=1))
  (out / "dynamics.md").write_text(dynamics_markdown(summary))
  return summary


def _fmt(v: float) -> str:
  return f"{v:.4g}"


def dynamics_markdown(s: dict) -> str:
  lines = [f"# Training dynamics: `{s['workdir']}`", "",
           f"Steps {s['steps'][0]} -> {s['steps'][1]}; variances: {s['variance_source']}.", "",
           f"- product of {s['weight_norm']} weight norms: {_fmt(s['weight_product'][0])} -> "
           f"{_fmt(s['weight_product'][1])}",
           f"- cumulative product of input variances (all layers): "
           f"{_fmt(s['variance_cumprod_last_layer'][0])} -> "
           f"{_fmt(s['variance_cumprod_last_layer'][1])}",
           f"- layers whose weight norm increased: {s['frac_weight_norms_increased']:.0%}; "
           f"whose input variance increased: {s['frac_variances_increased']:.0%}",
           "- final cumulative variance product vs depth: "
           f"x{_fmt(s['variance_cumprod_growth_per_layer_final'])} per layer (log-linear fit, R^2 {_fmt(s['variance_cumprod_fit_r2_final'])})", "",
           "| quantity | layer | first | last | last/first |", "|---|---|---|---|---|"]
  for r in s["layers"]:
    lines.append(f"| {r['quantity']} | {r['layer']} | {_fmt(r['first'])} | {_fmt(r['last'])} "
                 f"| {_fmt(r['ratio'])} |")
  return "\n".join(lines) + "\n"
