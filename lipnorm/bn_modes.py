"""The BatchNorm vocabulary, defined once. A leaf module: it imports nothing (no JAX),
so every layer of lipnorm, the config schema and the docs can use it.

BatchNorm is the one normalizer whose output for an example depends on the rest of
the batch, so three separate questions need names:

1. Which statistics normalize, in one forward pass: the boolean `use_batch_stats`.
   True: this batch's mean and variance; False: the running averages. Normalizer
   layers take it as a call argument; models take it too, defaulting to their `train`
   flag (which also switches dropout and stochastic depth).

2. Over which examples training computes those batch statistics: `config.bn_stats`,
   one of `BN_STATS_SCOPES` -- "global" (synced over the devices' pmap axis, i.e. the
   global batch; models get that axis as their `bn_axis_name` argument) or
   "per_device" (each device's own shard).

3. Which function a measurement sees: a "BN mode".
   * `FORWARD_BN_MODES` (forward-only quantities: the probes' layer statistics,
     `config.probes.bn_modes`): "eval" normalizes with the running statistics,
     "batch" with this batch's (the training forward pass; running stats untouched).
   * `LIPSCHITZ_BN_MODES` (derivatives: `bn_mode` of `lipnorm.lipschitz`,
     `config.probes.lipschitz_bn_modes`): "eval" as above; "batch_fixed" uses this
     batch's statistics held constant (an affine map per channel); "batch_coupled"
     differentiates through them (example i's output depends on every example).
     The two batch modes have the same forward values as "batch"; they differ only in
     the derivative.
"""
from __future__ import annotations

EVAL = "eval"
BATCH = "batch"
BATCH_FIXED = "batch_fixed"
BATCH_COUPLED = "batch_coupled"

FORWARD_BN_MODES = (EVAL, BATCH)
LIPSCHITZ_BN_MODES = (EVAL, BATCH_FIXED, BATCH_COUPLED)

GLOBAL = "global"
PER_DEVICE = "per_device"
BN_STATS_SCOPES = (GLOBAL, PER_DEVICE)


def uses_batch_stats(mode: str) -> bool:
  """`use_batch_stats` of the forward pass of a BN mode of either set: False only for
  "eval".

  >>> [uses_batch_stats(m) for m in LIPSCHITZ_BN_MODES]
  [False, True, True]
  """
  if mode not in FORWARD_BN_MODES + LIPSCHITZ_BN_MODES:
    raise ValueError(f"BN mode {mode!r}; allowed: "
                     f"{', '.join(dict.fromkeys(FORWARD_BN_MODES + LIPSCHITZ_BN_MODES))}")
  return mode != EVAL


__all__ = ["EVAL", "BATCH", "BATCH_FIXED", "BATCH_COUPLED", "FORWARD_BN_MODES",
           "LIPSCHITZ_BN_MODES", "GLOBAL", "PER_DEVICE", "BN_STATS_SCOPES",
           "uses_batch_stats"]
