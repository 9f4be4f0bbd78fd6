"""Accuracy and loss of a model on arrays, in fixed-size jitted chunks (eval mode)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn


def evaluate(model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int = 500) -> dict[str, float]:
  """{"accuracy", "loss"} of `model` (eval mode, BN on running statistics) on
  `images` `[N, ...]` / integer `labels` `[N]`; the last chunk is padded and masked so
  one compiled function serves every chunk. Non-finite logits count as wrong answers
  with infinite loss (a diverged net must not look accurate)."""
  n = len(labels)
  if n == 0:
    raise ValueError("evaluate: no examples")
  bs = min(batch_size, n)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  correct, loss = 0.0, 0.0
  for start in range(0, n, bs):
    x = np.asarray(images[start:start + bs])
    y = np.asarray(labels[start:start + bs])
    m = len(y)
    if m < bs:
      x = np.concatenate([x, np.zeros((bs - m,) + x.shape[1:], x.dtype)])
    logits = np.asarray(apply(variables, jnp.asarray(x)))[:m]
    finite = np.all(np.isfinite(logits), axis=1)
    correct += float(np.sum((logits.argmax(1) == y) & finite))
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(np.where(finite[:, None], logits, 0.0)), jnp.asarray(y)))
    loss += float(np.sum(np.where(finite, ce, np.inf)))
  return {"accuracy": correct / n, "loss": loss / n}
