"""E5: does capacity predict generalization?

A grid of nets (relu_net / cnn varying depth, width, normalizer and the number k of
normalized layers, learning rate, weight decay and batch size) is trained on a training
subset until the training cross-entropy (mean over the last logged window) reaches
`target_loss`, or a step cap (`max_steps`, or the model's entry of
`max_steps_per_model`: a cnn fits more slowly than a small relu_net). For each final net:

* the generalization gap: train - test accuracy ("gap") and test - train cross-entropy
  ("gap_loss"), both in eval mode on the unaugmented train subset / the full test split;
* capacity measures (`MEASURES`): the bounds of `lipnorm.lipschitz.upper_bound`
  (`BOUND_FIELDS`), the local input / parameter Lipschitz constants on a fixed train
  batch (max and mean), the top Hessian eigenvalue of the training loss, the product of
  the normalizer factors, and the margin-normalized versions (measure / the 10th
  percentile of the training margins, as in Jiang et al.; a monotone transform of their
  squared forms, so the rank statistics are the same);
* Kendall's tau of every measure against the gap over all nets, and the granulated
  tau of Jiang et al. (ICLR 2020) per hyperparameter axis with its mean Psi.

Each trained net writes `nets/<id>_s<seed>.json` and is skipped when that file exists,
so an interrupted campaign resumes where it stopped. Outputs: correlate.md, correlate.json,
scatter/<measure>.png.
"""
from __future__ import annotations

import itertools
import json
import math
import pathlib
import shutil
import time
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from lipnorm import lipschitz
from lipnorm.experiments import common, plots, stats
from lipnorm.experiments.evaluation import margins, metrics_from_logits, predict
from lipnorm.experiments.report import fmt, markdown_table

# Hyperparameters of one net; the granulated tau's axes are a subset (config.axes).
HYPERPARAMETERS = ("model", "depth", "width", "norm", "k", "lr", "wd", "batch")
MODELS = ("relu_net", "cnn")

# measure name -> BoundReport attributes tried in order (the first present is used).
# `paper_bound`: the paper's bound (layer norms x normalizer factors); `certified_bound`:
# lipnorm's tightest certified bound (never above the paper's); `product_bound`:
# normalizers counted as 1.
BOUND_FIELDS = {
    "paper_bound": ("paper_bound", "normalized_bound"),
    "certified_bound": ("certified_bound",),
    "product_bound": ("product_bound",),
}
MARGIN_NORMALIZED = ("paper_bound", "certified_bound", "product_bound", "lip_x_max",
                     "lip_x_mean")
MEASURES = (*BOUND_FIELDS, "lip_x_max", "lip_x_mean", "lip_theta_max", "lip_theta_mean",
            "hessian_top", "norm_factor_product",
            *(f"{m}/margin" for m in MARGIN_NORMALIZED))
TARGETS = ("gap", "gap_loss")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.out_dir = "runs/correlate"
  c.train = common.train_config()      # data (and subset), optimizer, logging
  c.train.probes.enabled = False       # E5 measures the final nets only
  c.train.schedule.name = "constant"   # training continues in chunks to the target
  c.target_loss = 0.05                 # stop when the train cross-entropy is below this
  c.max_steps = 4000                   # ... or at this many steps
  c.max_steps_per_model = ml_collections.ConfigDict()   # model -> its own step cap
  c.chunk_steps = 500                  # check the target every this many steps
  c.seeds = stats.seeds_field()   # None = train.seed only; a count or a list
  # Every net: `base` updated by one point of one block (each block: a dict whose tuple
  # values are varied jointly as a product, scalar values fixed); duplicates dropped.
  c.base = ml_collections.ConfigDict({
      "model": "relu_net", "depth": 4, "width": 128, "norm": "none", "k": "all",
      "lr": 0.01, "wd": 5e-4, "batch": 128})
  c.blocks = ({"norm": ("none", "batch", "layer")},)
  c.axes = ("depth", "width", "norm", "k", "lr", "wd", "batch")
  c.num_groups = 8                     # GroupNorm groups
  c.num_examples = 64                  # batch of the local Lipschitz constants
  c.hessian_examples = 256             # batch of the Hessian's training loss (0: skip)
  c.margin_percentile = 10.0
  c.keep_runs = False                  # keep each net's training workdir (checkpoints)
  return c


# ------------------------------------------------------------------------------ the grid

def grid(c: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The distinct nets of `c.base` x `c.blocks`, in block order."""
  base = c.base.to_dict()
  missing = set(HYPERPARAMETERS) - set(base)
  if missing:
    raise ValueError(f"correlate: base lacks {sorted(missing)}; it needs all of "
                     f"{list(HYPERPARAMETERS)}")
  nets, seen = [], set()
  for block in c.blocks:
    block = dict(block)
    unknown = set(block) - set(HYPERPARAMETERS)
    if unknown:
      raise ValueError(f"correlate: block {block!r} has unknown keys {sorted(unknown)}; "
                       f"allowed: {list(HYPERPARAMETERS)}")
    varied = {k: tuple(v) for k, v in block.items() if isinstance(v, (tuple, list))}
    fixed = {k: v for k, v in block.items() if k not in varied}
    for values in itertools.product(*varied.values()):
      net = _canonical({**base, **fixed, **dict(zip(varied, values))})
      if net_id(net) not in seen:
        seen.add(net_id(net))
        nets.append(net)
  return nets


def _canonical(net: dict) -> dict:
  """Checks a net; one spelling per net: k = "all" for a relu_net normalized on every
  hidden layer and for an unnormalized net (where k means nothing; so it groups with
  the normalized nets along the `norm` axis of the granulated tau)."""
  if net["model"] not in MODELS:
    raise ValueError(f"correlate: model {net['model']!r}; allowed: {list(MODELS)}")
  k = net["k"]
  if k != "all" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
    raise ValueError(f"correlate: k={k!r}; allowed: 'all' or an int >= 0")
  if net["norm"] == "none":
    return {**net, "k": "all"}
  if net["model"] == "relu_net" and k != "all" and k >= net["depth"] - 1:
    return {**net, "k": "all"}
  return net


def net_id(net: dict) -> str:
  k = net["k"]
  return (f"{net['model']}_d{net['depth']}_w{net['width']}_{net['norm']}_k{k}"
          f"_lr{net['lr']:g}_wd{net['wd']:g}_b{net['batch']}")


def model_kwargs(net: dict, num_groups: int) -> dict[str, Any]:
  """Model kwargs of a net: relu_net depth x width; cnn `depth` convs per stage with
  stage widths (w, 2w, 4w). `k`: normalizers on the first k slots ("all": every slot)."""
  kw: dict[str, Any] = {"norm": net["norm"], "norm_layers": net["k"]}
  if net["norm"] == "group":
    kw["norm_options"] = {"num_groups": num_groups}
  if net["model"] == "relu_net":
    kw.update(depth=net["depth"], width=net["width"])
  else:
    w = net["width"]
    kw.update(convs_per_stage=net["depth"], widths=(w, 2 * w, 4 * w))
  return kw


def train_config(c: ml_collections.ConfigDict, net: dict, seed: int
                 ) -> ml_collections.ConfigDict:
  t = common.with_model(c.train, net["model"], model_kwargs(net, c.num_groups))
  t.seed = seed
  t.optimizer.learning_rate = float(net["lr"])
  t.optimizer.weight_decay = float(net["wd"])
  t.data.batch_size = int(net["batch"])
  return t


# ------------------------------------------------------------------------- train, measure

def step_cap(c, model: str) -> int:
  """The step cap of a net of `model`: `c.max_steps_per_model[model]`, else `c.max_steps`."""
  return int(c.max_steps_per_model.get(model, c.max_steps))


def train_to_target(c, tcfg: ml_collections.ConfigDict, workdir: pathlib.Path,
                    max_steps: int | None = None
                    ) -> tuple[ml_collections.ConfigDict, dict]:
  """Trains in chunks of `c.chunk_steps` (resuming the workdir, constant learning rate)
  until the last logged training loss is <= `c.target_loss` or `max_steps` steps
  (default `c.max_steps`). Returns (the config of the last chunk, its summary)."""
  cap = int(c.max_steps if max_steps is None else max_steps)
  steps = min(int(c.chunk_steps), cap)
  while True:
    tcfg = tcfg.copy_and_resolve_references()
    tcfg.num_train_steps = steps
    tcfg.log_every_steps = min(tcfg.log_every_steps, steps)
    tcfg.eval_every_steps = tcfg.checkpoint_every_steps = steps
    summary = common.train_run(tcfg, workdir, override_config=True)
    loss = (summary.get("final") or {}).get("train_loss", math.nan)
    if (summary.get("status") != "completed" or not loss > c.target_loss
        or steps >= cap):
      return tcfg, summary
    steps = min(steps + int(c.chunk_steps), cap)


def bound_measures(model, variables, xs) -> dict[str, float]:
  """`BOUND_FIELDS` of the engine's report for the eval-mode function (normalizer
  statistics measured on `xs`) and the product of the normalizer factors."""
  try:
    st = lipschitz.normalizer_stats(model, variables, xs, bn_mode="eval")
    report = lipschitz.upper_bound(model, variables, input_shape=tuple(xs.shape[1:]),
                                   stats=st, bn_mode="eval")
  except lipschitz.NonFiniteError:        # a diverged net
    return {**{k: math.nan for k in BOUND_FIELDS}, "norm_factor_product": math.nan}
  out = {}
  for name, fields in BOUND_FIELDS.items():
    present = [f for f in fields if hasattr(report, f)]
    out[name] = float(getattr(report, present[0])) if present else math.nan
  out["norm_factor_product"] = float(report.norm_factor_product())
  return out


def measure_net(c, run: common.Run) -> dict[str, Any]:
  """Gap, margins and every capacity measure of a trained net."""
  ds = run.data.ds
  tr = ds.probe_batch(ds.info.num_train, "train")
  te = ds.probe_batch(ds.info.num_test, "test")
  tr_logits = predict(run.model, run.variables, tr["image"])
  train_m = metrics_from_logits(tr_logits, tr["label"])
  test_m = metrics_from_logits(predict(run.model, run.variables, te["image"]), te["label"])
  margin = float(np.nanpercentile(margins(tr_logits, tr["label"]), c.margin_percentile))
  row = {"train_accuracy": train_m["accuracy"], "test_accuracy": test_m["accuracy"],
         "train_loss": train_m["loss"], "test_loss": test_m["loss"],
         "gap": train_m["accuracy"] - test_m["accuracy"],
         "gap_loss": test_m["loss"] - train_m["loss"], "margin": margin}
  xs = jnp.asarray(tr["image"][:c.num_examples])
  hb = None
  if c.hessian_examples:
    n = min(int(c.hessian_examples), ds.info.num_train)
    hb = {"image": tr["image"][:n], "label": tr["label"][:n]}
  m = common.measure(run.model, run.variables, xs, bn_mode="eval", param=True, bound=False,
                     hessian_batch=hb, num_classes=ds.info.num_classes)
  row.update(m)
  row.update(bound_measures(run.model, run.variables, xs))
  for name in MARGIN_NORMALIZED:   # only meaningful when most train points are right
    row[f"{name}/margin"] = row[name] / margin if margin > 0 else math.nan
  return row


def run_net(c, net: dict, seed: int, out: pathlib.Path) -> dict[str, Any]:
  """Trains and measures one (net, seed), or reads its JSON if done before."""
  name = f"{net_id(net)}_s{seed}"
  path = out / "nets" / f"{name}.json"
  if path.exists():
    return json.loads(path.read_text())
  t0 = time.time()
  workdir = out / "runs" / name
  tcfg, summary = train_to_target(c, train_config(c, net, seed), workdir,
                                  step_cap(c, net["model"]))
  run = common.train_and_load(tcfg, workdir, num_examples=c.num_examples)
  rec = {"id": net_id(net), "seed": seed, **net, "steps": int(summary.get("step", -1)),
         "status": summary.get("status"),
         "last_window_train_loss": (summary.get("final") or {}).get("train_loss"),
         **measure_net(c, run)}
  rec["reached_target"] = bool(rec["last_window_train_loss"] is not None
                               and rec["last_window_train_loss"] <= c.target_loss)
  rec["wall_s"] = time.time() - t0
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rec, indent=1, default=float))
  if not c.keep_runs:
    shutil.rmtree(workdir, ignore_errors=True)
  return rec


# -------------------------------------------------------------------------------- report

def correlations(records: list[dict], axes, measures=MEASURES, targets=TARGETS
                 ) -> list[dict[str, Any]]:
  """Per measure and target: Kendall's tau over all records and the granulated tau per
  axis (groups: records equal in `model` and every other axis) with Psi."""
  out = []
  for measure in measures:
    for target in targets:
      g = stats.granulated_tau(records, measure, target, axes, fixed=("model",))
      n = sum(1 for r in records if math.isfinite(_f(r.get(measure)))
              and math.isfinite(_f(r.get(target))))
      out.append({"measure": measure, "target": target, "n": n,
                  "tau": stats.kendall_tau([r.get(measure) for r in records],
                                           [r.get(target) for r in records]),
                  "granulated": g["axes"], "psi": g["psi"]})
  return out


def _f(v) -> float:
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan


def per_net(records: list[dict]) -> list[dict[str, Any]]:
  """One record per net: every number averaged over its seeds (`<key>_stats` kept)."""
  numeric = sorted({k for r in records for k, v in r.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and k not in HYPERPARAMETERS and k != "seed"})
  agg = stats.aggregate(records, ["id", *HYPERPARAMETERS], numeric)
  for a in agg:
    a["seeds"] = [r["seed"] for r in records if r["id"] == a["id"]]
  return agg


def run_correlate(config: ml_collections.ConfigDict) -> dict[str, Any]:
  c = config
  if not c.target_loss > 0 or int(c.max_steps) < 1 or int(c.chunk_steps) < 1:
    raise ValueError(f"correlate: target_loss={c.target_loss!r} must be > 0 and "
                     f"max_steps={c.max_steps!r}, chunk_steps={c.chunk_steps!r} >= 1")
  caps = c.max_steps_per_model.to_dict()
  bad_caps = {m: v for m, v in caps.items() if m not in MODELS
              or isinstance(v, bool) or not isinstance(v, int) or v < 1}
  if bad_caps:
    raise ValueError(f"correlate: max_steps_per_model={bad_caps!r}; allowed: models "
                     f"{list(MODELS)} mapped to int step caps >= 1")
  bad_axes = set(c.axes) - set(HYPERPARAMETERS)
  if bad_axes:
    raise ValueError(f"correlate: axes {sorted(bad_axes)} unknown; allowed: "
                     f"{list(HYPERPARAMETERS)}")
  seeds = stats.seed_list(c.seeds, c.train.seed)
  nets = grid(c)
  out = pathlib.Path(c.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  records = [run_net(c, net, seed, out) for net in nets for seed in seeds]
  nets_agg = per_net(records)
  corr = correlations(nets_agg, tuple(c.axes))
  # Jiang et al. compare only nets trained to the same train cross-entropy: the same
  # statistics over the nets that reached the target with every seed.
  missed = {r["id"] for r in records if not r["reached_target"]}
  reached = [n for n in nets_agg if n["id"] not in missed]
  summary = {"num_nets": len(nets), "seeds": seeds, "target_loss": c.target_loss,
             "max_steps": int(c.max_steps), "max_steps_per_model": caps,
             "axes": list(c.axes),
             "num_reached_target": sum(r["reached_target"] for r in records),
             "correlations": corr, "nets": nets_agg,
             "num_nets_reached": len(reached),
             "correlations_reached": correlations(reached, tuple(c.axes)),
             "files": ["correlate.md", "correlate.json", "scatter/"]}
  _scatter(nets_agg, out / "scatter")
  (out / "correlate.json").write_text(json.dumps(summary, indent=1, default=float))
  (out / "correlate.md").write_text(correlate_markdown(summary))
  return summary


def _scatter(nets: list[dict], out: pathlib.Path) -> None:
  """scatter/<measure>.png: the measure (log x) against the accuracy gap, one colour
  per normalizer, one marker per model; error bars over seeds where there are several."""
  norms = sorted({n["norm"] for n in nets})
  markers = dict(zip(MODELS, "os"))
  for measure in MEASURES:
    fig, ax = plots.figure(1, width=4.8, height=3.8)
    a = ax[0]
    shown = False
    for n in nets:
      x, y = _f(n.get(measure)), _f(n.get("gap"))
      if not (math.isfinite(x) and math.isfinite(y) and x > 0):
        continue
      xs, ys = n.get(measure + "_stats") or {}, n.get("gap_stats") or {}
      a.errorbar(x, y, xerr=xs.get("std") or None, yerr=ys.get("std") or None,
                 fmt=markers[n["model"]], ms=4, color=plots.color_for(n["norm"], norms),
                 alpha=0.8, label=f"{n['norm']} ({n['model']})")
      shown = True
    if shown:
      a.set_xscale("log")
      handles, labels = a.get_legend_handles_labels()
      uniq = dict(zip(labels, handles))
      a.legend(uniq.values(), uniq.keys(), fontsize=6)
    a.set_xlabel(measure)
    a.set_ylabel("gap = train - test accuracy")
    a.set_title(f"{measure} vs generalization gap", fontsize=10)
    a.grid(alpha=0.3)
    plots.save(fig, out / f"{measure.replace('/', '_over_')}.png")


def _caps_text(s: dict) -> str:
  """'600 steps' or '600 steps (cnn: 3000)': the step caps of a summary."""
  caps = s.get("max_steps_per_model") or {}
  extra = ", ".join(f"{m}: {v}" for m, v in sorted(caps.items()))
  return f"{s['max_steps']} steps" + (f" ({extra})" if extra else "")


def correlate_markdown(s: dict) -> str:
  axes = s["axes"]
  def tau_rows(correlations):
    return [[r["measure"], r["target"], r["n"], r["tau"],
             *[r["granulated"][a]["tau"] for a in axes], r["psi"]] for r in correlations]
  rows = tau_rows(s["correlations"])
  reached = ""
  if s.get("correlations_reached"):
    r0 = s["correlations_reached"][0]["granulated"]
    reached = ("\n## Only the nets that reached the target\n\n"
               f"{s['num_nets_reached']} nets (every seed reached train cross-entropy <= "
               f"{fmt(s['target_loss'])}), as in Jiang et al.'s protocol. Groups per axis: "
               + ", ".join(f"{a}: {r0[a]['groups']}" for a in axes) + ".\n\n"
               + markdown_table(["measure", "target", "nets", "tau", *axes, "Psi"],
                                tau_rows(s["correlations_reached"])))
  net_rows = [[n["id"], stats.cell(n, "steps"), stats.cell(n, "train_loss"),
               stats.cell(n, "test_accuracy"), stats.cell(n, "gap"),
               stats.cell(n, "paper_bound"), stats.cell(n, "certified_bound"),
               stats.cell(n, "lip_x_max"),
               stats.cell(n, "hessian_top")] for n in s["nets"]]
  groups = ", ".join(f"{a}: {s['correlations'][0]['granulated'][a]['groups']}"
                     for a in axes) if s["correlations"] else ""
  return (f"# E5: does capacity predict generalization?\n\n"
          f"{s['num_nets']} nets x {len(s['seeds'])} seed(s) {s['seeds']}, trained to train "
          f"cross-entropy <= {fmt(s['target_loss'])} or {_caps_text(s)} "
          f"({s['num_reached_target']} runs reached the target). `gap` = train - test "
          "accuracy, `gap_loss` = test - train cross-entropy (eval mode). tau: Kendall's "
          "tau-b over all nets (seed-averaged); per-axis columns: granulated tau (Jiang et "
          "al. 2020: mean tau within groups of nets that differ only in that axis); Psi: "
          f"their mean. Groups per axis: {groups}.\n\n"
          + markdown_table(["measure", "target", "nets", "tau", *axes, "Psi"], rows)
          + reached
          + "\n## Nets (mean ± std over seeds)\n\n"
          + markdown_table(["net", "steps", "train CE", "test acc", "gap", "paper bound",
                            "certified bound", "Lip_x max", "Hessian top"], net_rows))
