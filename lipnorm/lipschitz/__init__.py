"""The Lipschitz engine: local Jacobian norms, sound upper bounds, lower-bound search and
loss sharpness, on plain callables, pytrees and `model.structure()` metadata.

Never imports lipnorm.training or lipnorm.data.
"""
from lipnorm.lipschitz.local import (ParamLipschitzResult, batch_fixed_variables,
                                     input_lipschitz, param_groups, param_lipschitz)
from lipnorm.lipschitz.model_info import BN_MODES, module_calls, resolve_bn_mode
from lipnorm.lipschitz.spectral import (EigResult, SpectralNormResult, choose_method,
                                        jacobian_spectral_norm, lanczos, power_iteration)

__all__ = [
    "BN_MODES", "EigResult", "ParamLipschitzResult", "SpectralNormResult",
    "batch_fixed_variables", "choose_method", "input_lipschitz", "jacobian_spectral_norm",
    "lanczos", "module_calls", "param_groups", "param_lipschitz", "power_iteration",
    "resolve_bn_mode",
]
