"""E3: the same architecture trained with each normalizer (claim C6).

For every normalizer in `norms`: train (`lipnorm.training`, probes on), then on the
final variables: train / test accuracy and loss (eval mode, unaugmented data), the
generalization gap (train - test accuracy), the local input and parameter Lipschitz
constants on a fixed batch (max and mean), the sound upper bound, the top Hessian
eigenvalue of the training loss, and whether training diverged. Writes compare.md,
compare.json, compare_metrics.png, compare_curves.png and each run's E2 figures.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import ml_collections
import numpy as np

from lipnorm.experiments import common, plots
from lipnorm.experiments.dynamics import default_config as dynamics_config
from lipnorm.experiments.dynamics import run_dynamics
from lipnorm.experiments.evaluation import evaluate
from lipnorm.experiments.records import first_key, read_records, series
from lipnorm.experiments.report import markdown_table

COLUMNS = (("test_accuracy", "test acc"), ("train_accuracy", "train acc"),
           ("gap", "gap"), ("test_loss", "test loss"), ("lip_x_max", "Lip_x max"),
           ("lip_x_mean", "Lip_x mean"), ("lip_theta_max", "Lip_theta max"),
           ("lip_theta_mean", "Lip_theta mean"), ("bound", "bound"),
           ("hessian_top", "Hessian top eig"), ("diverged", "diverged"))


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.out_dir = "runs/compare"
  c.norms = ("none", "batch", "layer", "group", "rms")
  # per-normalizer options, e.g. {"group": {"num_groups": 8}}
  c.norm_options = ml_collections.ConfigDict({"group": {"num_groups": 8}})
  c.train = common.train_config()
  c.num_examples = 64       # batch for the local Lipschitz constants
  c.num_eval = 10000        # train examples for the train accuracy (gap); test: all
  c.hessian = True
  c.hessian_examples = 256  # batch of the training loss whose Hessian is probed
  c.bn_mode = "eval"        # BN regime of the measured functions
  c.dynamics = True         # also write each run's E2 figures
  return c


def run_compare(config: ml_collections.ConfigDict) -> dict[str, Any]:
  c = config
  if not c.norms:
    raise ValueError("compare: norms is empty")
  out = pathlib.Path(c.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for norm in c.norms:
    opts = c.norm_options.get(norm, None)
    tcfg = common.with_norm(c.train, norm, opts.to_dict() if opts is not None else {})
    workdir = out / "runs" / norm
    run = common.train_and_load(tcfg, workdir)
    rows.append({"norm": norm, "workdir": str(workdir), **_evaluate_run(c, run)})
    if c.dynamics and not rows[-1]["diverged"]:
      dcfg = dynamics_config()
      dcfg.workdir, dcfg.out_dir, dcfg.title = str(workdir), str(workdir / "dynamics"), norm
      try:
        run_dynamics(dcfg)
      except ValueError as e:   # e.g. probes disabled: the table is still valid
        rows[-1]["dynamics_error"] = str(e)
  summary = {"model": c.train.model.to_dict(), "bn_mode": c.bn_mode, "rows": rows,
             "files": ["compare.md", "compare_metrics.png", "compare_curves.png"]}
  _plot(rows, out)
  (out / "compare.json").write_text(json.dumps(summary, indent=1))
  (out / "compare.md").write_text(compare_markdown(summary))
  return summary


def _evaluate_run(c, run: common.Run) -> dict[str, Any]:
  data = run.data
  tr = data.ds.probe_batch(min(c.num_eval, data.ds.info.num_train), "train")
  te = data.ds.probe_batch(data.ds.info.num_test, "test")
  train_m = evaluate(run.model, run.variables, tr["image"], tr["label"])
  test_m = evaluate(run.model, run.variables, te["image"], te["label"])
  row = {"train_accuracy": train_m["accuracy"], "test_accuracy": test_m["accuracy"],
         "train_loss": train_m["loss"], "test_loss": test_m["loss"],
         "gap": train_m["accuracy"] - test_m["accuracy"]}
  hb = data.ds.probe_batch(min(c.hessian_examples, data.ds.info.num_train), "train") \
      if c.hessian else None
  row.update(common.measure(run.model, run.variables, tr["image"][:c.num_examples],
                            bn_mode=c.bn_mode, param=True, hessian_batch=hb,
                            num_classes=data.ds.info.num_classes))
  chance = 1.0 / data.ds.info.num_classes
  row["diverged"] = bool(run.diverged or not math.isfinite(test_m["loss"])
                         or test_m["accuracy"] <= chance + 0.01)
  return row


def _plot(rows, out: pathlib.Path) -> None:
  names = [r["norm"] for r in rows]
  fig, ax = plots.figure(4, 2, width=3.6)
  for i, (key, label, log) in enumerate((
      ("test_accuracy", "test accuracy", False), ("gap", "train - test accuracy", False),
      ("test_loss", "test loss", False), ("lip_x_max", "local Lip_x (max)", True),
      ("lip_theta_max", "local Lip_theta (max)", True), ("bound", "upper bound on Lip_x", True),
      ("hessian_top", "top Hessian eigenvalue", True),
      ("norm_factor_product", "product of normalizer factors", True))):
    plots.bars(ax[i], names, [r.get(key, np.nan) for r in rows], title=label, ylabel=label,
               log=log)
  plots.save(fig, out / "compare_metrics.png")
  fig, ax = plots.figure(2)
  losses, accs, lx, ax_ = {}, {}, {}, {}
  for r in rows:
    records = read_records(r["workdir"])
    lkey = first_key(records, "train", ("loss",))
    if lkey:
      lx[r["norm"]], losses[r["norm"]] = series(records, "train", lkey)
    akey = first_key(records, "eval", ("accuracy",))
    if akey:
      ax_[r["norm"]], accs[r["norm"]] = series(records, "eval", akey)
  plots.lines(ax[0], lx, losses, title="training loss", xlabel="step", ylabel="loss")
  plots.lines(ax[1], ax_, accs, title="test accuracy", xlabel="step", ylabel="accuracy",
              log=False, markers=True)
  plots.save(fig, out / "compare_curves.png")


def compare_markdown(s: dict) -> str:
  model = ", ".join(f"{k}={v}" for k, v in s["model"].items()
                    if k not in ("norm", "norm_options"))
  rows = [[r["norm"], *[r.get(k) for k, _ in COLUMNS]] for r in s["rows"]]
  return (f"# E3 normalizer comparison ({model}; BN measured in `{s['bn_mode']}` mode)\n\n"
          "Lipschitz constants are local (spectral norms of Jacobians on a fixed train batch); "
          "`bound` is the engine's sound upper bound on the global input Lipschitz constant; "
          "`gap` = train - test accuracy (eval mode, unaugmented).\n\n"
          + markdown_table(["norm", *[h for _, h in COLUMNS]], rows))
