"""Normalization layers and their registry. Imports nothing else of lipnorm but the
leaf `lipnorm.registry`."""
from lipnorm.normalizers.layers import (NORM_STATS, BatchNorm, GroupNorm, Identity, RMSNorm,
                                        check_not_degenerate, divisors, lipschitz_factor,
                                        resolve_num_groups)
from lipnorm.normalizers.registry import (channel_groups, get_normalizer, is_normalizer,
                                          normalizer_names)

__all__ = ["NORM_STATS", "BatchNorm", "GroupNorm", "Identity", "RMSNorm",
           "check_not_degenerate", "divisors", "lipschitz_factor", "resolve_num_groups",
           "channel_groups", "get_normalizer", "is_normalizer", "normalizer_names"]
