"""Layer metadata: how a model tells other code where its linear maps and normalizers are.

Every model in the zoo has a method `structure()` returning a tree of the nodes below,
in forward order. `lipnorm.lipschitz` composes bounds from it and `lipnorm.probes`
finds layers with it, so neither parses parameter names. A node's `path` is the tuple
of submodule names leading to the layer's variables, e.g. `variables["params"][*path]`.

Composition rules a consumer applies (docs/theory.md#residual-blocks):
  Sequential   -> product of the children's constants
  Residual     -> Lip(shortcut) + Lip(branch), shortcut None meaning identity (Lip 1)
  Unbounded    -> no sound finite bound without extra assumptions; `reason` says why
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union


@dataclasses.dataclass(frozen=True)
class Linear:
  """A dense map (`kind="dense"`, kernel `[in, out]`) or a convolution (`kind="conv"`,
  kernel `[kh, kw, in/groups, out]`, NHWC). The bias does not change the Lipschitz
  constant. For convs the operator norm is that of the whole map at the layer's input
  size, with these strides / padding / feature groups."""
  path: tuple[str, ...]
  kind: str = "dense"
  strides: tuple[int, ...] = (1, 1)
  padding: Union[str, tuple] = "SAME"
  feature_group_count: int = 1


@dataclasses.dataclass(frozen=True)
class Norm:
  """A normalizer from `lipnorm.normalizers` (`kind` is its registry name). Its
  variables are `params[*path]` (scale, bias) and, for BN, `batch_stats[*path]`."""
  path: tuple[str, ...]
  kind: str
  epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True)
class Activation:
  """An elementwise nonlinearity with global Lipschitz constant `lipschitz`."""
  name: str
  lipschitz: float = 1.0


@dataclasses.dataclass(frozen=True)
class Pool:
  """A linear pooling map: `avg` over `window` with `strides` and `padding`, or
  `global_avg` over all positions. `max` pooling is not linear; its Lipschitz constant
  is at most sqrt(the most windows any input position falls in): 1 for non-overlapping
  windows, 2 for the 3x3 stride-2 ImageNet-stem pool."""
  kind: str
  window: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  padding: Union[str, tuple] = "VALID"


@dataclasses.dataclass(frozen=True)
class Flatten:
  """Reshape: an isometry."""


@dataclasses.dataclass(frozen=True)
class Sequential:
  layers: tuple["Node", ...]


@dataclasses.dataclass(frozen=True)
class Residual:
  """`y = shortcut(x) + branch(x)`; `shortcut=None` is the identity."""
  branch: "Node"
  shortcut: Optional["Node"] = None


@dataclasses.dataclass(frozen=True)
class Unbounded:
  """A part with no sound global bound (e.g. squeeze-excitation gating x * s(x)):
  `reason` says why; `path` locates it; `inner` optionally lists its layers so probes
  can still find linear maps and normalizers inside."""
  reason: str
  path: tuple[str, ...] = ()
  inner: Optional["Node"] = None


Node = Union[Linear, Norm, Activation, Pool, Flatten, Sequential, Residual, Unbounded]


def seq(*layers: Node) -> Sequential:
  """Sequential, flattening nested Sequentials and dropping `None` entries."""
  out: list[Node] = []
  for layer in layers:
    if layer is None:
      continue
    if isinstance(layer, Sequential):
      out.extend(layer.layers)
    else:
      out.append(layer)
  return Sequential(tuple(out))


def iter_nodes(node: Node, kinds: Sequence[type] = (Linear, Norm)):
  """All nodes of the given types in forward order (shortcut before branch)."""
  if isinstance(node, tuple(kinds)):
    yield node
  if isinstance(node, Sequential):
    for child in node.layers:
      yield from iter_nodes(child, kinds)
  elif isinstance(node, Residual):
    if node.shortcut is not None:
      yield from iter_nodes(node.shortcut, kinds)
    yield from iter_nodes(node.branch, kinds)
  elif isinstance(node, Unbounded) and node.inner is not None:
    yield from iter_nodes(node.inner, kinds)


def linear_layers(node: Node) -> list[Linear]:
  return list(iter_nodes(node, (Linear,)))


def norm_layers(node: Node, include_none: bool = False) -> list[Norm]:
  return [n for n in iter_nodes(node, (Norm,)) if include_none or n.kind != "none"]
