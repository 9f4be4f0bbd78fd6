"""Helpers shared by the model definitions."""
from __future__ import annotations

from typing import Sequence, Union

NormLayers = Union[str, int, Sequence[int]]


def normalized_indices(norm_layers: NormLayers, num_layers: int) -> frozenset[int]:
  """Which of `num_layers` candidate positions (0-based) carry a normalizer.

  `"all"` -> every position; an int k -> the first k; a sequence -> exactly those.
  ValueError names the bad value and what is allowed.
  """
  if isinstance(norm_layers, str):
    if norm_layers != "all":
      raise ValueError(
          f"norm_layers={norm_layers!r}; allowed: 'all', an int k in [0, {num_layers}], "
          f"or a list of layer indices in [0, {num_layers - 1}]")
    return frozenset(range(num_layers))
  if isinstance(norm_layers, bool):
    raise ValueError(f"norm_layers={norm_layers!r} must be 'all', an int or a list")
  if isinstance(norm_layers, int):
    if not 0 <= norm_layers <= num_layers:
      raise ValueError(
          f"norm_layers={norm_layers} (first k normalized) must be in [0, {num_layers}]")
    return frozenset(range(norm_layers))
  idx = [int(i) for i in norm_layers]
  bad = [i for i in idx if not 0 <= i < num_layers]
  if bad or len(set(idx)) != len(idx):
    raise ValueError(
        f"norm_layers={list(norm_layers)}: indices must be distinct and in "
        f"[0, {num_layers - 1}]")
  return frozenset(idx)
