"""Explicit weight constructions with known Lipschitz behaviour (claims C2, C7).

* `scaled_orthogonal`: a dense kernel all of whose singular values equal `c`, so
  ||W||_2 = c exactly.
* `amplifying_variables`: a relu_net whose every dense kernel is `c * (semi-)orthogonal`
  (||W_l||_2 = c <= 1), normalizer gains gamma = 1 and shifts beta = 0. With a
  normalizer on every hidden layer, each one divides by the std of its input, which is
  ~c times the std of the previous activations, so the per-layer factor
  ||W_l|| * gamma / sigma_l ~ 1 / std(relu(N(z))) > 1 does not depend on c: the network
  is in the amplifying regime of C7 (the 2026 counter-paper's construction: small input
  variance, gamma = 1, ||W_l||_2 <= 1) and its Lipschitz constant can grow exponentially
  with depth while the unnormalized net with the same weights has Lip <= c^L <= 1.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from lipnorm.probes import probe_layout


def scaled_orthogonal(key: jax.Array, shape: tuple[int, int], c: float) -> jax.Array:
  """`[in, out]` kernel with orthonormal rows or columns times `c` (all singular values c)."""
  if len(shape) != 2:
    raise ValueError(f"scaled_orthogonal needs a dense kernel shape [in, out], got {shape}")
  if not c > 0:
    raise ValueError(f"scaled_orthogonal: c={c!r} must be > 0")
  return c * nn.initializers.orthogonal()(key, shape, jnp.float32)


def amplifying_variables(model: nn.Module, variables: Any, *, weight_norm: float,
                         key: jax.Array) -> dict:
  """`variables` of a dense model with every kernel replaced by `scaled_orthogonal(c)`
  (c = weight_norm), every bias zero and every normalizer scale one / bias zero
  (running statistics untouched: calibrate them on data afterwards)."""
  layout = probe_layout(model.structure())
  if any(k != "dense" for k in layout.linear_kinds):
    raise ValueError(f"amplifying_variables supports dense layers only, got kinds "
                     f"{sorted(set(layout.linear_kinds))}")
  params = jax.tree.map(lambda a: a, _mutable(variables["params"]))
  for i, path in enumerate(layout.linear_paths):
    node = _at(params, path)
    node["kernel"] = scaled_orthogonal(jax.random.fold_in(key, i), node["kernel"].shape,
                                       weight_norm)
    if "bias" in node:
      node["bias"] = jnp.zeros_like(node["bias"])
  for path in layout.norm_paths:
    node = _at(params, path)
    if "scale" in node:
      node["scale"] = jnp.ones_like(node["scale"])
    if "bias" in node:
      node["bias"] = jnp.zeros_like(node["bias"])
  return {**variables, "params": params}


def _mutable(tree: Any) -> Any:
  if hasattr(tree, "items"):
    return {k: _mutable(v) for k, v in tree.items()}
  return tree


def _at(tree: dict, path: tuple[str, ...]) -> dict:
  for key in path:
    tree = tree[key]
  return tree


def scaled_permutation_variables(model: nn.Module, variables: Any, *, scale: float,
                                 key: jax.Array) -> dict:
  """The exponential construction (docs/theory.md#c2): every dense kernel `scale * P_l` with P_l
  a random permutation matrix (square layers, no bias). On the positive orthant every
  ReLU is active, so the network is `x -> scale^L * P x` there and its input Lipschitz
  constant is exactly `scale^L` (L = number of linear maps)."""
  layout = probe_layout(model.structure())
  params = _mutable(variables["params"])
  for i, path in enumerate(layout.linear_paths):
    node = _at(params, path)
    n_in, n_out = node["kernel"].shape
    if n_in != n_out or "bias" in node or layout.linear_kinds[i] != "dense":
      raise ValueError(f"scaled_permutation_variables needs square dense layers without "
                       f"bias; {'/'.join(path)} has kernel {node['kernel'].shape}"
                       f"{' and a bias' if 'bias' in node else ''}")
    perm = jax.random.permutation(jax.random.fold_in(key, i), n_in)
    node["kernel"] = scale * jnp.eye(n_in, dtype=node["kernel"].dtype)[perm]
  return {**variables, "params": params}
