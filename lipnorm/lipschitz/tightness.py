"""Soundness and tightness of the bounds on random networks: the harness behind
`bench/bound_tightness.py` and `tests/test_bound_soundness.py`.

Per net: the paper's bound, the folded product, the chain bound and the certified bound
(`upper_bound`), the best lower value (the largest local constant ||J_x f(x_i)||_2 over
the data, and for global-scope nets the lower-bound search), their ratios and any
violation (a bound below a lower value). LN/GN/IN/RMS bounds hold in the data scope
(inputs whose normalizer statistics are at least the measured minima), so their lower
value is the local constants at the data the statistics came from (the search may leave
that scope).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lipnorm.lipschitz.bounds import normalizer_stats, upper_bound
from lipnorm.lipschitz.local import input_lipschitz
from lipnorm.lipschitz.search import lower_bound_search
from lipnorm.models import get_model

BOUND_NAMES = ("paper", "folded", "chain", "certified")
RELU_NET_NORMS = {"none": None, "batch": None, "layer": None, "group": {"num_groups": 4},
                  "rms": None}
CNN_NORMS = {**RELU_NET_NORMS, "group": {"num_groups": 2}, "instance": None}


def random_variables(model, input_shape, rng: np.random.Generator,
                     kernel_scale=(0.3, 3.0)) -> dict:
  """Variables drawn with NumPy: He-normal kernels times a per-layer factor log-uniform
  in `kernel_scale`, biases N(0, 0.1^2), gains U(0.5, 1.5) with random signs, shifts
  N(0, 0.1^2), BN running means N(0, 0.5^2) and variances log-uniform in [0.05, 5]."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, *input_shape)))
  lo, hi = np.log(kernel_scale[0]), np.log(kernel_scale[1])

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if path[0].key == "batch_stats":
      value = (rng.normal(0, 0.5, shape) if name == "mean"
               else np.exp(rng.uniform(np.log(0.05), np.log(5.0), shape)))
    elif name == "kernel":
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape) * np.exp(rng.uniform(lo, hi))
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
    else:
      value = rng.normal(0, 0.1, shape)
    return jnp.asarray(value, jnp.float32)
  shapes = {k: v for k, v in shapes.items() if k != "norm_stats"}
  return jax.tree_util.tree_map_with_path(draw, shapes)


def random_net(arch: str, norm: str, rng: np.random.Generator, *, max_depth: int = 8,
               max_width: int = 64):
  """(model, variables, input_shape, description) of a random relu_net (depth 2..8,
  width in {8, 16, 32, 64} up to max_width, 7 inputs) or small cnn (8x8x3, widths
  (4, 8), 1-2 convs per stage, avg-pool downsampling), 5 classes."""
  if arch == "relu_net":
    depth = int(rng.integers(2, max_depth + 1))
    width = int(rng.choice([w for w in (8, 16, 32, 64) if w <= max_width]))
    model = get_model("relu_net", depth=depth, width=width, num_classes=5, norm=norm,
                      norm_options=RELU_NET_NORMS[norm])
    shape, desc = (7,), f"relu_net d{depth} w{width}"
  elif arch == "cnn":
    per = int(rng.integers(1, 3))
    model = get_model("cnn", widths=(4, 8), convs_per_stage=per, num_classes=5, norm=norm,
                      norm_options=CNN_NORMS[norm])
    shape, desc = (8, 8, 3), f"cnn (4, 8) x{per}"
  else:
    raise ValueError(f"arch={arch!r}; allowed: 'relu_net', 'cnn'")
  return model, random_variables(model, shape, rng), shape, desc


@dataclasses.dataclass(frozen=True)
class NetTightness:
  """One net's bounds, lower values and ratios (bound / best lower)."""
  arch: str
  norm: str
  desc: str
  scope: str
  bounds: dict
  local_max: float
  search: float
  best_lower: float
  ratios: dict
  violations: tuple
  flags: int


def evaluate(model, variables, xs, *, arch: str = "", norm: str = "", desc: str = "",
             search_steps: int = 30, rtol: float = 1e-5) -> NetTightness:
  """Bounds vs lower values of one net on the data `xs` (module docstring)."""
  bn_mode = "eval" if norm == "batch" else None
  stats = normalizer_stats(model, variables, xs) if norm not in ("none", "batch") else None
  rep = upper_bound(model, variables, input_shape=tuple(xs.shape[1:]), stats=stats)
  values = {"paper": rep.paper_bound, "folded": rep.folded_bound,
            "chain": rep.chain_bound, "certified": rep.certified_bound}
  local = float(jnp.max(input_lipschitz(model, variables, xs, bn_mode=bn_mode).value))
  search = math.nan
  if rep.scope == "global" and search_steps > 0:
    search = float(lower_bound_search(model, variables, xs, bn_mode=bn_mode,
                                      steps=search_steps).value)
  best = max(local, search) if math.isfinite(search) else local
  ratios = {k: (v / best if best > 0 else math.inf) for k, v in values.items()}
  violations = tuple(f"{k}={v:.6g} < lower {best:.6g}" for k, v in values.items()
                     if v < best * (1 - rtol))
  return NetTightness(arch, norm, desc, rep.scope, values, local, search, best, ratios,
                      violations, len(rep.flags))


def sweep(nets_per_norm: int, *, archs=("relu_net", "cnn"), seed: int = 0,
          num_examples: int = 16, search_steps: int = 30, max_depth: int = 8,
          max_width: int = 64, norms: Optional[dict] = None, log=None) -> list:
  """`evaluate` on `nets_per_norm` random nets per (arch, normalizer); `norms` picks
  some normalizer names (those an arch does not take are skipped)."""
  rng = np.random.default_rng(seed)
  out = []
  for arch in archs:
    allowed = RELU_NET_NORMS if arch == "relu_net" else CNN_NORMS
    for norm in [n for n in (norms or allowed) if n in allowed]:
      for _ in range(nets_per_norm):
        model, v, shape, desc = random_net(arch, norm, rng, max_depth=max_depth,
                                           max_width=max_width)
        xs = jnp.asarray(2.0 * rng.standard_normal((num_examples, *shape)), jnp.float32)
        res = evaluate(model, v, xs, arch=arch, norm=norm, desc=desc,
                       search_steps=search_steps)
        if log is not None:
          log(res)
        out.append(res)
  return out


def summary_rows(results: list) -> list[dict]:
  """Per (arch, norm): nets, median and worst ratio of each bound, violations."""
  rows = []
  keys = sorted({(r.arch, r.norm) for r in results}, key=lambda k: (k[0] != "relu_net", k))
  for arch, norm in keys:
    sel = [r for r in results if (r.arch, r.norm) == (arch, norm)]
    row = {"arch": arch, "norm": norm, "nets": len(sel), "scope": sel[0].scope,
           "violations": sum(len(r.violations) for r in sel)}
    for name in BOUND_NAMES:
      vals = np.array([r.ratios[name] for r in sel])
      row[f"{name}_median"] = float(np.median(vals))
      row[f"{name}_worst"] = float(np.max(vals))
    rows.append(row)
  return rows


def markdown_table(rows: list[dict]) -> str:
  """The summary as a markdown table (paper vs certified, median / worst ratio)."""
  lines = ["| net | normalizer | scope | nets | paper median | paper worst | certified median "
           "| certified worst | violations |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['arch']} | {r['norm']} | {r['scope']} | {r['nets']} | "
                 f"{r['paper_median']:.3g} | {r['paper_worst']:.3g} | "
                 f"{r['certified_median']:.3g} | {r['certified_worst']:.3g} | "
                 f"{r['violations']} |")
  return "\n".join(lines)
