"""Per-layer statistics recorded on a fixed probe batch (docs/theory.md#layer-statistics).

`LayerProber(model)(variables, x)` -> {bn_mode: LayerProbes}; `flatten_probes` turns that
into loggable scalars and per-layer lists. `lipnorm.probes.hooks.probe_hook_fns` builds
the training-loop hooks from `config.probes` (`lipnorm.probes.options`).
"""
from lipnorm.lazy_exports import lazy_exports

# Imported on first use: `lipnorm.probes.options` (read by the config schema) loads
# without JAX.
_EXPORTS = {
    "FORWARD_BN_MODES": "options",
    **dict.fromkeys(["LINEAR_STATS", "NORM_STATS_KEYS", "LayerProbes", "amplifying_mask",
                     "assemble", "group_gains", "make_probe_fn"], "layer_stats"),
    "ProbeLayout": "layout", "probe_layout": "layout",
    **dict.fromkeys(["LayerProber", "flatten_probes", "weight_operator_norms",
                     "weight_spectral_norms"], "prober"),
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
