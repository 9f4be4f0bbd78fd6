"""Where a model's linear maps and normalizers are, in forward order, read from `structure()`.

Probes never parse parameter names: they take paths from the model's structure metadata
(`lipnorm.models.structure`), so every model in the zoo is probed the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from lipnorm.models import structure as st

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ProbeLayout:
  """The probed layers of one model, in forward order (shortcut before branch).

  Attributes:
    linear_paths: variable path of each Linear node (dense or conv).
    linear_kinds: "dense" or "conv", one per linear path.
    linear_normalized: True where the linear map's output goes straight into a
      normalizer (kind != "none") in the same Sequential; its pre-activation variance is
      then that normalizer's input variance, and the remaining ones are the
      "unnormalized layers" whose pre-activation variance docs/theory.md#layer-statistics asks for.
    norm_paths / norm_kinds / norm_eps: each normalizer (kind != "none") with its
      registry name and epsilon.
  """
  linear_paths: tuple[Path, ...]
  linear_kinds: tuple[str, ...]
  linear_normalized: tuple[bool, ...]
  norm_paths: tuple[Path, ...]
  norm_kinds: tuple[str, ...]
  norm_eps: tuple[float, ...]

  @property
  def num_linear(self) -> int:
    return len(self.linear_paths)

  @property
  def num_norm(self) -> int:
    return len(self.norm_paths)

  def linear_names(self) -> list[str]:
    return ["/".join(p) for p in self.linear_paths]

  def norm_names(self) -> list[str]:
    return ["/".join(p) for p in self.norm_paths]


def _walk(node: st.Node, next_node: st.Node | None = None
          ) -> Iterator[tuple[st.Node, st.Node | None]]:
  """Yields (Linear or Norm node, the node right after it in its Sequential)."""
  if isinstance(node, (st.Linear, st.Norm)):
    yield node, next_node
  elif isinstance(node, st.Sequential):
    layers = node.layers
    for i, child in enumerate(layers):
      following = layers[i + 1] if i + 1 < len(layers) else None
      yield from _walk(child, following)
  elif isinstance(node, st.Residual):
    if node.shortcut is not None:
      yield from _walk(node.shortcut)
    yield from _walk(node.branch)
  elif isinstance(node, st.Unbounded) and node.inner is not None:
    yield from _walk(node.inner)


def probe_layout(structure: st.Node) -> ProbeLayout:
  """Builds the layout from a model's `structure()` tree."""
  lin_paths, lin_kinds, lin_norm = [], [], []
  norm_paths, norm_kinds, norm_eps = [], [], []
  for node, following in _walk(structure):
    if isinstance(node, st.Linear):
      lin_paths.append(tuple(node.path))
      lin_kinds.append(node.kind)
      lin_norm.append(isinstance(following, st.Norm) and following.kind != "none")
    elif node.kind != "none":
      norm_paths.append(tuple(node.path))
      norm_kinds.append(node.kind)
      norm_eps.append(float(node.epsilon))
  return ProbeLayout(tuple(lin_paths), tuple(lin_kinds), tuple(lin_norm),
                     tuple(norm_paths), tuple(norm_kinds), tuple(norm_eps))
