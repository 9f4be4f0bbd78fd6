"""BatchNorm running statistics set from a batch, so eval mode is a fixed affine map that
matches batch mode on that batch (used to measure eval-mode Lipschitz constants of
freshly initialized BN nets, whose running stats are still (0, 1))."""
from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn

from lipnorm.normalizers import NORM_STATS
from lipnorm.probes.layout import probe_layout


def calibrate_batch_stats(model: nn.Module, variables: Any, x: jax.Array) -> Any:
  """Variables whose BN `batch_stats` are replaced by the batch mean / variance of each BN
  input on `x` `[N, ...]`, computed with every BN on batch statistics (training forward).

  Then `model.apply(out, x)` (eval mode) equals `model.apply(variables, x,
  use_batch_stats=True)`. Models without BatchNorm are returned unchanged.
  """
  layout = probe_layout(model.structure())
  paths = [p for p, k in zip(layout.norm_paths, layout.norm_kinds) if k == "batch"]
  if not paths:
    return variables
  clean = {k: v for k, v in variables.items() if k not in (NORM_STATS, "intermediates")}
  _, state = model.apply(clean, x, train=False, use_batch_stats=True, mutable=[NORM_STATS])
  stats = _unfreeze(clean["batch_stats"])
  for path in paths:
    sown = state[NORM_STATS]
    node = stats
    for key in path:
      sown = sown[key]
      node = node[key]
    node["mean"], node["var"] = sown["mean"], sown["var"]
  return {**clean, "batch_stats": stats}


def _unfreeze(tree: Any) -> Any:
  if hasattr(tree, "items"):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree
