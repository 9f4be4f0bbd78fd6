"""The Lipschitz engine: local Jacobian norms, sound upper bounds, lower-bound search and
loss sharpness, on plain callables, pytrees and `model.structure()` metadata.

Never imports lipnorm.training or lipnorm.data.
"""
from lipnorm.lipschitz.bounds import (BoundEntry, BoundReport, merge_stats, normalizer_stats,
                                      upper_bound)
from lipnorm.lipschitz.hessian import HessianEigenResult, hessian_top_eigenvalues
from lipnorm.lipschitz.local import (ParamLipschitzResult, batch_fixed_variables,
                                     input_lipschitz, param_groups, param_lipschitz)
from lipnorm.lipschitz.model_info import BN_MODES, module_calls, resolve_bn_mode
from lipnorm.lipschitz.operator_norms import (OperatorNorm, conv_operator_norm,
                                              dense_operator_norm, layer_operator_norms,
                                              pool_operator_norm)
from lipnorm.lipschitz.search import LowerBoundResult, lower_bound_search
from lipnorm.lipschitz.spectral import (EigResult, SpectralNormResult, choose_method,
                                        jacobian_spectral_norm, lanczos, power_iteration)

__all__ = [
    "BN_MODES", "BoundEntry", "BoundReport", "EigResult", "HessianEigenResult",
    "LowerBoundResult", "OperatorNorm", "ParamLipschitzResult", "SpectralNormResult",
    "batch_fixed_variables", "choose_method", "conv_operator_norm", "dense_operator_norm",
    "hessian_top_eigenvalues", "input_lipschitz", "jacobian_spectral_norm", "lanczos",
    "layer_operator_norms", "lower_bound_search", "merge_stats", "module_calls",
    "normalizer_stats",
    "param_groups", "param_lipschitz", "pool_operator_norm", "power_iteration",
    "resolve_bn_mode", "upper_bound",
]
