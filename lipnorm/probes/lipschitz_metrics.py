"""Network-level Lipschitz measurements on a batch, through `lipnorm.lipschitz`: the
local input / parameter constants, the sound upper bound and the top Hessian eigenvalue
of the cross-entropy loss. Used by the training hook and by the experiments."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from lipnorm import lipschitz

NAN = float("nan")


def has_batchnorm(model: nn.Module) -> bool:
  return bool(lipschitz.model_info.batchnorm_paths(model, {}))


def _finite_or_none(fn: Callable, *args, **kwargs):
  """Runs a measurement; a non-finite network (diverged) gives None instead of raising."""
  try:
    return fn(*args, **kwargs)
  except ValueError as e:
    if "finite" in str(e):
      return None
    raise


def _max_mean(result) -> tuple[float, float]:
  if result is None:
    return NAN, NAN
  v = np.asarray(result.value, np.float64)
  return float(np.max(v)), float(np.mean(v))


def loss_fn(model: nn.Module, variables: Mapping, num_classes: int) -> Callable:
  """`loss(params, batch)`: mean softmax cross-entropy of `batch["image"]` vs
  `batch["label"]`, BN on batch statistics (the training objective; running stats
  untouched), no dropout."""
  bn = has_batchnorm(model)
  rest = {k: v for k, v in variables.items() if k not in ("params", "norm_stats")}

  def loss(params, batch):
    logits = model.apply({**rest, "params": params}, batch["image"], train=False,
                         use_batch_stats=True if bn else None)
    labels = jax.nn.one_hot(batch["label"], num_classes)
    return jnp.mean(optax.softmax_cross_entropy(logits, labels))
  return loss


def hessian_top(model: nn.Module, variables: Mapping, batch: Mapping, num_classes: int
                ) -> float:
  """Top eigenvalue of the Hessian of `loss_fn` w.r.t. the parameters on `batch`."""
  res = _finite_or_none(lipschitz.hessian_top_eigenvalues,
                        loss_fn(model, variables, num_classes), variables["params"],
                        {"image": jnp.asarray(batch["image"]),
                         "label": jnp.asarray(batch["label"])}, k=1)
  return NAN if res is None else float(np.asarray(res.eigenvalues).reshape(-1)[0])


def bound_value(model: nn.Module, variables: Mapping, xs: jax.Array) -> float:
  """The Lipschitz engine's sound upper bound on the global input Lipschitz constant of
  the eval-mode network (NaN where the engine has no finite bound)."""
  report = _finite_or_none(lipschitz.upper_bound, model, variables,
                           input_shape=tuple(xs.shape[1:]))
  return NAN if report is None else float(report.value)


def lipschitz_metrics(model: nn.Module, variables: Mapping, xs: jax.Array, *,
                      bn_mode: str = "eval", param: bool = True, bound: bool = True,
                      hessian_batch: Optional[Mapping[str, Any]] = None,
                      num_classes: int = 10) -> dict[str, float]:
  """{lip_x_max, lip_x_mean, [lip_theta_max, lip_theta_mean], [bound], [hessian_top]}.

  lip_x: ||J_x f(x_i)||_2 over the examples of `xs`; lip_theta: ||J_theta f(x_i)||_2
  (all parameters); BN measured in `bn_mode` ("eval" | "batch_fixed" | "batch_coupled",
  see `lipnorm.lipschitz.local`), which other models ignore. `bound` is computed for
  the function actually measured: in "batch_fixed" mode that of the network whose BN
  statistics are those of `xs`. Non-finite networks give NaN.
  """
  mode = bn_mode if has_batchnorm(model) else None
  out: dict[str, float] = {}
  out["lip_x_max"], out["lip_x_mean"] = _max_mean(
      _finite_or_none(lipschitz.input_lipschitz, model, variables, xs, bn_mode=mode))
  if param:
    out["lip_theta_max"], out["lip_theta_mean"] = _max_mean(
        _finite_or_none(lipschitz.param_lipschitz, model, variables, xs, bn_mode=mode))
  if bound:
    fixed = lipschitz.batch_fixed_variables(model, variables, xs) \
        if mode == "batch_fixed" else variables
    out["bound"] = bound_value(model, fixed, xs)
  if hessian_batch is not None:
    out["hessian_top"] = hessian_top(model, variables, hessian_batch, num_classes)
  return out
