"""Accuracy and loss of a model on arrays, in fixed-size jitted chunks (eval mode), with
the training evaluation's numbers (`lipnorm.training.steps.eval_sums` / `eval_metrics`)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lipnorm.training.steps import eval_metrics, eval_sums


def evaluate(model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray, *,
             batch_size: int = 500, num_classes: int | None = None) -> dict[str, float]:
  """{"accuracy", "loss", "num_examples"} of `model` (eval mode, BN on running
  statistics) on `images` `[N, ...]` / integer `labels` `[N]`; the last chunk is padded
  and masked so one compiled function serves every chunk. Non-finite logits count as
  wrong answers with infinite loss (a diverged net must not look accurate)."""
  n = len(labels)
  if n == 0:
    raise ValueError("evaluate: no examples")
  bs = min(batch_size, n)

  @jax.jit
  def sums(v, x, y, mask):
    logits = model.apply(v, x, train=False)
    return eval_sums(logits, y, mask, num_classes or logits.shape[-1])

  def chunks():
    for start in range(0, n, bs):
      x = np.asarray(images[start:start + bs])
      y = np.asarray(labels[start:start + bs])
      m = len(y)
      mask = np.arange(bs) < m
      if m < bs:
        x = np.concatenate([x, np.zeros((bs - m,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros((bs - m,), y.dtype)])
      yield sums(variables, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))

  return eval_metrics(chunks())
