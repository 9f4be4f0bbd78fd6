"""E3: the same architecture trained with each normalizer (claim C6).

For every normalizer in `norms`: train (`lipnorm.training`, probes on), then on the
final variables: train / test accuracy and loss (eval mode, unaugmented data), the
generalization gap (train - test accuracy), the local input and parameter Lipschitz
constants on a fixed batch (max and mean), the two sound upper bounds (the paper's
bound and lipnorm's tightest certified bound), the top Hessian
eigenvalue of the training loss, whether training diverged, and a plateau check: the
change of the test accuracy between the training run's last two evaluations
(`last_eval_change`; its evaluations are in `test_accuracy_curve`). Writes compare.md,
compare.json, compare_metrics.png, compare_curves.png and each run's E2 figures.

With several `seeds` every normalizer is trained once per seed (workdirs
runs/<norm>_s<seed>; one seed keeps runs/<norm>): the table shows mean ± std over seeds,
the bars and curves the spread, and the verdicts say whether each normalizer's test
accuracy and gap differ from the first normalizer's by more than the seed noise (Welch).
"""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
from typing import Any

import ml_collections
import numpy as np

from lipnorm.experiments import common, plots, stats
from lipnorm.experiments.dynamics import default_config as dynamics_config
from lipnorm.experiments.dynamics import run_dynamics
from lipnorm.experiments.evaluation import evaluate
from lipnorm.experiments.records import first_key, read_records, series
from lipnorm.experiments.report import markdown_table
from lipnorm.training.run_log import write_json_atomic

COLUMNS = (("test_accuracy", "test acc"), ("train_accuracy", "train acc"),
           ("gap", "gap"), ("test_loss", "test loss"), ("lip_x_max", "Lip_x max"),
           ("lip_x_mean", "Lip_x mean"), ("lip_theta_max", "Lip_theta max"),
           ("lip_theta_mean", "Lip_theta mean"), ("bound", "paper bound"),
           ("lip_bound_certified", "certified bound"),
           ("hessian_top", "Hessian top eig"), ("last_eval_change", "acc change, last eval"),
           ("diverged", "diverged"))


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
  c.seeds = stats.seeds_field()   # None = train.seed only; a count n or a list of seeds
  return c


def run_compare(config: ml_collections.ConfigDict) -> dict[str, Any]:
  c = config
  if not c.norms:
    raise ValueError("compare: norms is empty")
  seeds = stats.seed_list(c.seeds, c.train.seed)
  out = pathlib.Path(c.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for norm in c.norms:
    opts = c.norm_options.get(norm, None)
    for seed in seeds:
      tcfg = common.with_norm(c.train, norm, opts.to_dict() if opts is not None else {})
      tcfg.seed = seed
      name = stats.seed_run_name(norm, seed, seeds, c.train.seed, out / "runs")
      workdir = out / "runs" / name
      run = common.train_and_load(tcfg, workdir)
      rows.append({"norm": norm, "seed": seed, "workdir": str(workdir),
                   **_evaluate_cached(c, run), **eval_curve(workdir)})
      if c.dynamics and not rows[-1]["diverged"]:
        dcfg = dynamics_config()
        dcfg.workdir, dcfg.out_dir = str(workdir), str(workdir / "dynamics")
        dcfg.title = norm if len(seeds) == 1 and seed == c.train.seed else f"{norm} seed {seed}"
        try:
          run_dynamics(dcfg)
        except ValueError as e:   # e.g. probes disabled: the table is still valid
          rows[-1]["dynamics_error"] = str(e)
  keys = [k for k, _ in COLUMNS] + ["train_loss", "norm_factor_product", "product_bound"]
  summary = {"model": c.train.model.to_dict(), "bn_mode": c.bn_mode, "seeds": seeds,
             "rows": rows, "aggregate": stats.aggregate(rows, ["norm"], keys),
             "verdicts": verdicts(rows, list(c.norms)),
             "files": ["compare.md", "compare_metrics.png", "compare_curves.png"]}
  _plot(summary, out)
  (out / "compare.json").write_text(json.dumps(summary, indent=1))
  (out / "compare.md").write_text(compare_markdown(summary))
  return summary


def verdicts(rows: list[dict], norms: list[str],
             keys: tuple[str, ...] = ("test_accuracy", "gap")) -> list[dict[str, Any]]:
  """For each normalizer after the first (the reference, usually "none") and each of
  `keys`: mean difference to the reference over seeds, its Welch 95% interval and whether
  it is inside the seed noise (None with a single seed)."""
  ref = norms[0]
  out = []
  for norm in norms[1:]:
    for key in keys:
      d = stats.difference([r.get(key) for r in rows if r["norm"] == norm],
                           [r.get(key) for r in rows if r["norm"] == ref])
      out.append({"norm": norm, "reference": ref, "metric": key, "delta": d.delta,
                  "low": d.low, "high": d.high, "p_value": d.p_value,
                  "inside_noise": d.inside_noise,
                  "text": d.text(f"{norm} - {ref} {key}:")})
  return out


def eval_curve(workdir) -> dict[str, Any]:
  """{"test_accuracy_curve": [[step, accuracy], ...] of the run's evaluations during
  training (eval mode, full test split), "last_eval_change": the last minus the one
  before (None with fewer than two): whether test accuracy had reached a plateau}."""
  records = read_records(workdir)
  if not first_key(records, "eval", ("accuracy",)):
    return {"test_accuracy_curve": [], "last_eval_change": None}
  steps, acc = series(records, "eval", "accuracy")
  curve = [[int(t), float(a)] for t, a in zip(steps, acc)]
  change = curve[-1][1] - curve[-2][1] if len(curve) > 1 else None
  return {"test_accuracy_curve": curve, "last_eval_change": change}


ROW_FILE = "compare_row.json"


def _evaluate_cached(c, run: common.Run) -> dict[str, Any]:
  """`_evaluate_run`, stored in the run's workdir (ROW_FILE) with what it depends on (the
  evaluation settings, the run's stored config, last step and status), and reused when
  those match: a rerun of `compare`, or one that adds normalizers or seeds, measures each
  finished run once."""
  config_file = pathlib.Path(run.workdir) / "config.json"   # the run's stored config
  key = {"num_examples": c.num_examples, "num_eval": c.num_eval, "hessian": c.hessian,
         "hessian_examples": c.hessian_examples, "bn_mode": c.bn_mode,
         "step": run.summary.get("step"), "status": run.summary.get("status"),
         "config_sha256": hashlib.sha256(config_file.read_bytes()).hexdigest()
         if config_file.exists() else None}
  path = pathlib.Path(run.workdir) / ROW_FILE
  try:
    stored = json.loads(path.read_text())
    if stored.get("key") == key:
      return stored["row"]
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    pass   # absent, torn or from other settings: measure again
  row = _evaluate_run(c, run)
  write_json_atomic(path, {"key": key, "row": row})
  return row


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


def _plot(summary: dict, out: pathlib.Path) -> None:
  agg = summary["aggregate"]
  names = [a["norm"] for a in agg]
  fig, ax = plots.figure(3, 3, width=3.6)
  for i, (key, label, log) in enumerate((
      ("test_accuracy", "test accuracy", False), ("gap", "train - test accuracy", False),
      ("test_loss", "test loss", False), ("lip_x_max", "local Lip_x (max)", True),
      ("lip_theta_max", "local Lip_theta (max)", True), ("bound", "paper bound on Lip_x", True),
      ("lip_bound_certified", "certified bound on Lip_x", True),
      ("hessian_top", "top Hessian eigenvalue", True),
      ("norm_factor_product", "product of normalizer factors", True))):
    plots.bars(ax[i], names, [a.get(key, np.nan) for a in agg], title=label, ylabel=label,
               log=log, errors=[a[key + "_stats"]["std"] for a in agg])
  plots.save(fig, out / "compare_metrics.png")
  fig, ax = plots.figure(2)
  loss_x, loss_runs, acc_x, acc_runs = {}, {}, {}, {}
  for r in summary["rows"]:
    records = read_records(r["workdir"])
    for kind, x, runs, ax_key in (("train", loss_x, loss_runs, "loss"),
                                  ("eval", acc_x, acc_runs, "accuracy")):
      if first_key(records, kind, (ax_key,)):
        steps, v = series(records, kind, ax_key)
        if r["norm"] in x and len(x[r["norm"]]) != len(steps):
          continue          # a diverged seed stopped early: its curve does not align
        x[r["norm"]] = steps
        runs.setdefault(r["norm"], []).append(v)
  plots.bands(ax[0], loss_x, loss_runs, title="training loss", xlabel="step", ylabel="loss")
  plots.bands(ax[1], acc_x, acc_runs, title="test accuracy", xlabel="step",
              ylabel="accuracy", log=False, markers=True)
  plots.save(fig, out / "compare_curves.png")


def compare_markdown(s: dict) -> str:
  model = ", ".join(f"{k}={v}" for k, v in s["model"].items()
                    if k not in ("norm", "norm_options"))
  seeds = s.get("seeds", [None])
  head = (f"# E3 normalizer comparison ({model}; BN measured in `{s['bn_mode']}` mode)\n\n"
          "Lipschitz constants are local (spectral norms of Jacobians on a fixed train batch); "
          "`paper bound` (the product of layer norms and normalizer factors) and "
          "`certified bound` (lipnorm's tightest certified bound) are sound upper bounds on "
          "the global input Lipschitz constant; "
          "`gap` = train - test accuracy (eval mode, unaugmented); `acc change, last eval` = "
          "the change of the test accuracy between the run's last two evaluations during "
          "training (near 0: a plateau).\n\n")
  if len(seeds) <= 1:
    rows = [[r["norm"], *[r.get(k) for k, _ in COLUMNS]] for r in s["rows"]]
    return head + markdown_table(["norm", *[h for _, h in COLUMNS]], rows)
  rows = [[a["norm"], a["n_runs"], *[stats.cell(a, k) for k, _ in COLUMNS]]
          for a in s["aggregate"]]
  return (head + f"Mean ± std over seeds {seeds} (`diverged`: the fraction of seeds).\n\n"
          + markdown_table(["norm", "seeds", *[h for _, h in COLUMNS]], rows)
          + "\n## Differences to the reference (Welch, 95%)\n\n"
          + "".join(f"- {v['text']}\n" for v in s["verdicts"])
          + "\n## Every run\n\n"
          + markdown_table(["norm", "seed", *[h for _, h in COLUMNS]],
                           [[r["norm"], r["seed"], *[r.get(k) for k, _ in COLUMNS]]
                            for r in s["rows"]]))
