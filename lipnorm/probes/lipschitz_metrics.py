"""Network-level Lipschitz measurements on a batch, through `lipnorm.lipschitz`: the
local input / parameter constants, the sound upper bound and the top Hessian eigenvalue
of the cross-entropy loss. Used by the training hook and by the experiments."""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lipnorm import lipschitz
from lipnorm.lipschitz.certified import DEFAULT_CHAIN_MAX_DIM
from lipnorm.losses import cross_entropy

NAN = float("nan")


has_batchnorm = lipschitz.has_batchnorm


def _finite_or_none(fn: Callable, *args, **kwargs):
  """Runs a measurement; a non-finite network (diverged) gives None instead of raising."""
  try:
    return fn(*args, **kwargs)
  except lipschitz.NonFiniteError:
    return None


def _max_mean(result) -> tuple[float, float]:
  if result is None:
    return NAN, NAN
  v = np.asarray(result.value, np.float64)
  return float(np.max(v)), float(np.mean(v))


@functools.lru_cache(maxsize=32)
def loss_fn(model: nn.Module, num_classes: int) -> Callable:
  """`loss(params, batch)`: mean softmax cross-entropy of `batch["image"]` vs
  `batch["label"]` with the model's other collections in `batch["collections"]`; BN on
  batch statistics (the training objective; running stats untouched), no dropout.
  Cached per (model, num_classes), so the Hessian solver (which takes the loss as a
  static argument) compiles once per model."""
  bn = has_batchnorm(model)

  def loss(params, batch):
    logits = model.apply({**batch["collections"], "params": params}, batch["image"],
                         train=False, use_batch_stats=True if bn else None)
    return jnp.mean(cross_entropy(logits, batch["label"], num_classes))
  return loss


def hessian_top(model: nn.Module, variables: Mapping, batch: Mapping, num_classes: int, *,
                num_iters: int = 20, tol: float = 1e-3) -> tuple[float, bool]:
  """(top eigenvalue of the Hessian of `loss_fn` w.r.t. the parameters on `batch`,
  whether Lanczos met its tolerance). `num_iters` bounds the Lanczos memory
  (num_iters x num_params floats); NaN for a non-finite loss."""
  collections = {k: v for k, v in variables.items() if k not in ("params", "norm_stats")}
  res = _finite_or_none(lipschitz.hessian_top_eigenvalues, loss_fn(model, num_classes),
                        variables["params"],
                        {"image": jnp.asarray(batch["image"]),
                         "label": jnp.asarray(batch["label"]), "collections": collections},
                        k=1, num_iters=num_iters, tol=tol)
  if res is None:
    return NAN, False
  return float(np.asarray(res.eigenvalues).reshape(-1)[0]), bool(res.converged)


BOUND_KEYS = ("bound", "lip_bound_paper", "lip_bound_certified", "product_bound",
              "norm_factor_product", "lip_bound_degenerate_norms")


def bounds(model: nn.Module, variables: Mapping, xs: jax.Array, bn_mode: str, *,
           chain_max_dim: int = DEFAULT_CHAIN_MAX_DIM
           ) -> dict[str, float]:
  """The engine's bound report for the function measured in `bn_mode`, with normalizer
  statistics measured on `xs` (so LN/GN/IN/RMS and batch_fixed BN factors hold on this
  data; inf where no bound is sound):
    "lip_bound_paper": the paper's bound (product of layer norms and per-normalizer
      factors max|gamma|/sigma); "bound" is the same number (its older name);
    "lip_bound_certified": lipnorm's tightest certified bound (normalizer diagonals
      folded into the kernels, slope-set chain bound; `lipnorm.lipschitz.certified`);
    "product_bound": every normalizer counted as 1 (the unnormalized product
      prod ||W_l||_2 for sequential nets); "norm_factor_product": product of the
      normalizer factors; "lip_bound_degenerate_norms": how many normalizers have a
      (minimum) input variance below the report's threshold.
  `chain_max_dim` (see `lipnorm.lipschitz.upper_bound`): the slope-set chain bound runs
  only on chains whose maps have at most this many inputs / outputs (0: never; then
  "lip_bound_certified" is the folded product). Its cost grows with the cube of the
  widths: seconds per call for relu_net-10 at width 512 on CIFAR inputs."""
  stats = _finite_or_none(lipschitz.normalizer_stats, model, variables, xs, bn_mode=bn_mode)
  report = None if stats is None else _finite_or_none(
      lipschitz.upper_bound, model, variables, input_shape=tuple(xs.shape[1:]),
      stats=stats, bn_mode=bn_mode, chain_max_dim=chain_max_dim)
  if report is None:
    return {k: NAN for k in BOUND_KEYS}
  return {"bound": float(report.paper_bound), "lip_bound_paper": float(report.paper_bound),
          "lip_bound_certified": float(report.certified_bound),
          "product_bound": float(report.product_bound),
          "norm_factor_product": float(report.norm_factor_product()),
          "lip_bound_degenerate_norms": float(len(report.flags))}


def lipschitz_metrics(model: nn.Module, variables: Mapping, xs: jax.Array, *,
                      bn_mode: str = "eval", param: bool = True, bound: bool = True,
                      hessian_batch: Optional[Mapping[str, Any]] = None,
                      num_classes: int = 10,
                      chain_max_dim: int = DEFAULT_CHAIN_MAX_DIM
                      ) -> dict[str, float]:
  """{lip_x_max, lip_x_mean, [lip_theta_max, lip_theta_mean], [bound, lip_bound_paper,
  lip_bound_certified, product_bound, norm_factor_product, lip_bound_degenerate_norms],
  [hessian_top, hessian_converged]}.

  lip_x: ||J_x f(x_i)||_2 over the examples of `xs`; lip_theta: ||J_theta f(x_i)||_2
  (all parameters); BN measured in `bn_mode` ("eval" | "batch_fixed" | "batch_coupled",
  see `lipnorm.lipschitz.local`), which other models ignore. `bound` (see `bounds`) is
  for the function actually measured (`chain_max_dim`: see `bounds`). Non-finite
  networks give NaN.
  """
  mode = bn_mode if has_batchnorm(model) else None
  out: dict[str, float] = {}
  out["lip_x_max"], out["lip_x_mean"] = _max_mean(
      _finite_or_none(lipschitz.input_lipschitz, model, variables, xs, bn_mode=mode))
  if param:
    out["lip_theta_max"], out["lip_theta_mean"] = _max_mean(
        _finite_or_none(lipschitz.param_lipschitz, model, variables, xs, bn_mode=mode))
  if bound:
    out.update(bounds(model, variables, xs, mode or "eval", chain_max_dim=chain_max_dim))
  if hessian_batch is not None:
    out["hessian_top"], converged = hessian_top(model, variables, hessian_batch, num_classes)
    out["hessian_converged"] = float(converged)
  return out
