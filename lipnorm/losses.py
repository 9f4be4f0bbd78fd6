"""The one softmax cross-entropy of lipnorm (training, evaluation, probes, experiments)."""
from __future__ import annotations

import jax
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy `[N]` of logits `[N, num_classes]` against integer
  labels `[N]` as (optionally smoothed) one-hot targets."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return optax.softmax_cross_entropy(logits, targets)
