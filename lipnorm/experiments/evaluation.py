"""Logits, accuracy, loss and margins of a model on arrays, in fixed-size jitted chunks
(eval mode), with the training evaluation's numbers (`lipnorm.training.steps.eval_sums` /
`eval_metrics`)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lipnorm.training.steps import eval_metrics, eval_sums


def predict(model: nn.Module, variables: Any, images: np.ndarray, *,
            batch_size: int = 500) -> np.ndarray:
  """Logits `[N, num_classes]` (float32 NumPy) of `model` in eval mode (BN on running
  statistics) on `images` `[N, ...]`; the last chunk is padded, so one compiled
  function serves every chunk."""
  n = len(images)
  if n == 0:
    raise ValueError("predict: no examples")
  bs = min(batch_size, n)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  out = []
  for start in range(0, n, bs):
    x = np.asarray(images[start:start + bs])
    m = len(x)
    if m < bs:
      x = np.concatenate([x, np.zeros((bs - m,) + x.shape[1:], x.dtype)])
    out.append(np.asarray(apply(variables, jnp.asarray(x)))[:m])
  return np.concatenate(out)


def evaluate(model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int = 500) -> dict[str, float]:
  """{"accuracy", "loss", "num_examples"} of `model` (eval mode, BN on running
  statistics) on `images` `[N, ...]` / integer `labels` `[N]`. Non-finite logits count
  as wrong answers with infinite loss (a diverged net must not look accurate)."""
  return metrics_from_logits(predict(model, variables, images, batch_size=batch_size),
                             labels)


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """{"accuracy", "loss", "num_examples"} of logits `[N, C]` against integer labels
  `[N]`, through the training evaluation's `eval_sums` (see `evaluate` for non-finite
  rows)."""
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  mask = jnp.ones(labels.shape, jnp.float32)
  return eval_metrics([eval_sums(logits, labels, mask, logits.shape[-1])])


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Output margins `[N]`: the true class's logit minus the largest other logit
  (negative for a misclassified example; NaN for a non-finite row)."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  idx = np.arange(len(labels))
  true = logits[idx, labels]
  others = logits.copy()
  others[idx, labels] = -np.inf
  m = true - others.max(axis=1)
  return np.where(np.all(np.isfinite(logits), axis=1), m, np.nan)
