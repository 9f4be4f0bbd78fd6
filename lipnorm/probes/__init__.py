"""Per-layer statistics recorded on a fixed probe batch (docs/theory.md#layer-statistics).

`LayerProber(model)(variables, x)` -> {bn_mode: LayerProbes}; `flatten_probes` turns that
into loggable scalars and per-layer lists. `lipnorm.probes.hooks.probe_hook_fns` builds
the training-loop hooks from `config.probes` (`lipnorm.probes.options`).
"""
from lipnorm.bn_modes import FORWARD_BN_MODES
from lipnorm.probes.layer_stats import (LINEAR_STATS, NORM_STATS_KEYS, LayerProbes,
                                        amplifying_mask, assemble, group_gains, make_probe_fn)
from lipnorm.probes.layout import ProbeLayout, probe_layout
from lipnorm.probes.prober import (LayerProber, flatten_probes, weight_operator_norms,
                                   weight_spectral_norms)

__all__ = ["FORWARD_BN_MODES", "LINEAR_STATS", "NORM_STATS_KEYS", "LayerProbes",
           "amplifying_mask", "assemble", "group_gains", "make_probe_fn", "ProbeLayout",
           "probe_layout", "LayerProber", "flatten_probes", "weight_operator_norms",
           "weight_spectral_norms"]
