"""The Lipschitz engine: local Jacobian norms, sound upper bounds, lower-bound search and
loss sharpness, on plain callables, pytrees and `model.structure()` metadata.

The names below are the public API; everything else (Lanczos and power-iteration
kernels, method choice, model introspection) lives in the submodules and may change.
Results are immutable (frozen dataclasses / flax struct dataclasses). A measurement that
meets NaN or inf raises `NonFiniteError` (a ValueError); bad arguments raise ValueError.
BatchNorm models need `bn_mode`, one of `LIPSCHITZ_BN_MODES` (see `lipnorm.bn_modes`).

>>> import jax, jax.numpy as jnp
>>> from lipnorm import lipschitz
>>> f = lambda x: jnp.array([[3.0, 0.0], [0.0, 1.0]]) @ x
>>> float(lipschitz.jacobian_spectral_norm(f, jnp.ones(2)).value)
3.0

The local input constant of a model at each example of a batch (here one dense map, so
it is the kernel's spectral norm everywhere):

>>> from lipnorm.models import get_model
>>> model = get_model("relu_net", depth=1, num_classes=3)
>>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
>>> res = lipschitz.input_lipschitz(model, variables, jnp.ones((2, 4)))
>>> kernel = variables["params"]["dense_0"]["kernel"]
>>> bool(jnp.allclose(res.value, jnp.linalg.norm(kernel, 2), rtol=1e-4))
True
>>> try:
...   lipschitz.input_lipschitz(model, variables, jnp.full((2, 4), jnp.nan))
... except lipschitz.NonFiniteError as e:
...   print(e)
xs contains non-finite values (NaN or inf)

Never imports lipnorm.training or lipnorm.data.
"""
from lipnorm.bn_modes import LIPSCHITZ_BN_MODES
from lipnorm.lipschitz.bounds import (BoundEntry, BoundReport, merge_stats, normalizer_stats,
                                      upper_bound)
from lipnorm.lipschitz.errors import NonFiniteError
from lipnorm.lipschitz.hessian import HessianEigenResult, hessian_top_eigenvalues
from lipnorm.lipschitz.local import (ParamLipschitzResult, batch_fixed_variables,
                                     input_lipschitz, param_groups, param_lipschitz)
from lipnorm.lipschitz.model_info import has_batchnorm
from lipnorm.lipschitz.operator_norms import (OperatorNorm, conv_operator_norm,
                                              dense_operator_norm, layer_operator_norms,
                                              pool_operator_norm)
from lipnorm.lipschitz.search import LowerBoundResult, lower_bound_search
from lipnorm.lipschitz.spectral import (DEFAULT_MAX_JACOBIAN_BYTES, SpectralNormResult,
                                        jacobian_spectral_norm, power_iteration)

__all__ = [
    # constants and errors
    "DEFAULT_MAX_JACOBIAN_BYTES", "LIPSCHITZ_BN_MODES", "NonFiniteError",
    # local constants (lower values) and their results
    "input_lipschitz", "param_lipschitz", "param_groups", "batch_fixed_variables",
    "jacobian_spectral_norm", "power_iteration", "lower_bound_search",
    "SpectralNormResult", "ParamLipschitzResult", "LowerBoundResult",
    # sound upper bounds
    "upper_bound", "normalizer_stats", "merge_stats", "BoundEntry", "BoundReport",
    "layer_operator_norms", "dense_operator_norm", "conv_operator_norm",
    "pool_operator_norm", "OperatorNorm",
    # loss sharpness
    "hessian_top_eigenvalues", "HessianEigenResult",
    # models
    "has_batchnorm",
]
