"""What the engine reads off a model: its structure metadata, per-module input shapes,
its BatchNorm layers, and nested-dict access to variables at a path.

Everything here is generic Flax introspection plus `lipnorm.models.structure`; the
engine never imports model code.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from lipnorm.bn_modes import LIPSCHITZ_BN_MODES
from lipnorm.lipschitz.errors import NonFiniteError
from lipnorm.models import structure as st

Path = tuple[str, ...]


def get_at(tree: Mapping, path: Sequence[str], default: Any = None) -> Any:
  """`tree[path[0]][path[1]]...`, or `default` when a key is missing."""
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return default
    node = node[key]
  return node


def structure_of(model: nn.Module) -> Optional[st.Node]:
  """`model.structure()` when the model provides it, else None."""
  fn = getattr(model, "structure", None)
  return fn() if callable(fn) else None


def batchnorm_paths(model: nn.Module, variables: Mapping) -> list[Path]:
  """Paths of BatchNorm layers: Norm nodes of kind "batch" in `structure()`, or (for
  models without structure) every module path holding `batch_stats`."""
  node = structure_of(model)
  if node is not None:
    return [n.path for n in st.norm_layers(node) if n.kind == "batch"]
  flat = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
  return sorted({k[:-1] for k in flat})


def has_batchnorm(model: nn.Module, variables: Optional[Mapping] = None) -> bool:
  """Whether the model has a BatchNorm layer (so measurements need a `bn_mode`);
  `variables` is only read for models without `structure()`."""
  return bool(batchnorm_paths(model, variables or {}))


def check_bn_mode(bn_mode: Optional[str], allow_none: bool = False) -> None:
  """ValueError unless `bn_mode` is one of `LIPSCHITZ_BN_MODES` (or None if allowed)."""
  if bn_mode is None and allow_none:
    return
  if bn_mode not in LIPSCHITZ_BN_MODES:
    raise ValueError(f"bn_mode={bn_mode!r}; allowed: "
                     f"{', '.join(map(repr, LIPSCHITZ_BN_MODES))}")


def resolve_bn_mode(model: nn.Module, variables: Mapping, bn_mode: Optional[str]) -> str:
  """The BatchNorm regime to use. Required (one of LIPSCHITZ_BN_MODES) when the model
  has BN; optional otherwise (then "eval", the only meaningful one: f is per example)."""
  check_bn_mode(bn_mode, allow_none=True)
  bn = batchnorm_paths(model, variables)
  if bn and bn_mode is None:
    raise ValueError(
        f"the model has BatchNorm at {['/'.join(p) for p in bn]}, so bn_mode is required: "
        f"one of {', '.join(map(repr, LIPSCHITZ_BN_MODES))} ('eval': running statistics; "
        "'batch_fixed': this batch's statistics held constant; 'batch_coupled': "
        "differentiate through the batch statistics)")
  if not bn:
    return "eval"
  return bn_mode


@dataclasses.dataclass(frozen=True)
class ModuleCall:
  """One module call seen while tracing the model on a single example."""
  path: Path
  module_type: str
  in_shape: tuple[int, ...]
  out_size: int
  module: Any   # the bound module (read its attributes only)


def module_calls(model: nn.Module, variables: Mapping, input_shape: Sequence[int],
                 dtype=jnp.float32, **apply_kwargs) -> dict[Path, ModuleCall]:
  """Input shape (of args[0], batch of 1) of every module call, keyed by module path,
  found with `nn.intercept_methods` under `jax.eval_shape` (no FLOPs are spent).
  The first call of a path wins. Raises ValueError when the model rejects the shape.
  Traced once per (model, variable shapes, input shape, dtype, apply kwargs) and cached
  (the result depends on shapes only; probes call this at every bound)."""
  kwargs = tuple(sorted(apply_kwargs.items()))
  return dict(shape_cached(
      "module_calls", model, variables, (tuple(input_shape), str(dtype), kwargs),
      lambda: _traced_module_calls(model, variables, input_shape, dtype, **apply_kwargs)))


def _traced_module_calls(model: nn.Module, variables: Mapping, input_shape: Sequence[int],
                         dtype=jnp.float32, **apply_kwargs) -> dict[Path, ModuleCall]:
  calls: dict[Path, ModuleCall] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and args and hasattr(args[0], "shape"):
      path = tuple(context.module.path)
      if path not in calls:
        size = sum(math.prod(o.shape) for o in jax.tree.leaves(out) if hasattr(o, "shape"))
        calls[path] = ModuleCall(path, type(context.module).__name__,
                                 tuple(args[0].shape), size, context.module)
    return out

  x = jax.ShapeDtypeStruct((1, *tuple(input_shape)), dtype)
  apply_kwargs = {"train": False, **apply_kwargs}
  try:
    with nn.intercept_methods(interceptor):
      jax.eval_shape(lambda v, x: model.apply(v, x, **apply_kwargs), variables, x)
  except Exception as e:  # noqa: BLE001  (report any shape failure as a ValueError)
    raise ValueError(f"input_shape={tuple(input_shape)} (one example, no batch axis) does "
                     f"not fit the model {type(model).__name__}: {type(e).__name__}: {e}"
                     ) from e
  return calls


def _signature(variables: Mapping) -> tuple:
  flat = traverse_util.flatten_dict(dict(variables))
  return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in flat.items()))


_SHAPE_CACHE: dict = {}


def shape_cached(tag: str, model: nn.Module, variables: Mapping, extra: tuple, compute):
  """`compute()` cached under (tag, model, the variables' shapes and dtypes, extra): for
  results that depend on shapes only (traces of the model), so repeated measurements of
  changing weights do not re-trace it. Computed every time when the model or `extra`
  is unhashable."""
  try:
    key = (tag, model, _signature(variables), extra)
    hash(key)
  except (TypeError, AttributeError):   # unhashable model / extra, or non-array leaves
    return compute()
  if key not in _SHAPE_CACHE:
    value = compute()
    if len(_SHAPE_CACHE) > 256:
      _SHAPE_CACHE.clear()
    _SHAPE_CACHE[key] = value
  return _SHAPE_CACHE[key]


def example_sizes(model: nn.Module, variables: Mapping, example_shape: Sequence[int],
                  dtype=jnp.float32) -> tuple[int, int]:
  """(output size, rough forward-activation bytes) of one example, traced once per
  (model, variable shapes, example shape, dtype) and cached: repeated calls in a
  training loop do not re-trace the model. Raises ValueError when the shape does not
  fit the model."""
  def compute():
    calls = module_calls(model, variables, example_shape, dtype)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                         jax.ShapeDtypeStruct((1, *example_shape), dtype))
    out_size = sum(math.prod(o.shape) for o in jax.tree.leaves(out))
    return out_size, sum(c.out_size for c in calls.values()) * jnp.dtype(dtype).itemsize
  return shape_cached("example_sizes", model, variables, (tuple(example_shape), str(dtype)),
                      compute)


def check_finite_variables(variables: Mapping) -> None:
  """NonFiniteError naming the first leaf of `variables` that holds NaN or inf (a
  diverged net): a bound of such weights would be NaN, or a NumPy SVD failure."""
  # NumPy, not jnp: an eager jnp op compiles once per leaf shape, and the bound reads the
  # kernels into NumPy anyway.
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    if not isinstance(leaf, jax.core.Tracer) and not np.isfinite(np.asarray(leaf)).all():
      raise NonFiniteError(f"variables{jax.tree_util.keystr(path)} holds non-finite "
                           "values (NaN or inf): a diverged net has no bound")


def check_batch(model: nn.Module, variables: Mapping, xs: jax.Array) -> tuple[int, int]:
  """ValueError unless `xs` is a batch `[N, ...]` the model accepts (NonFiniteError when
  it holds NaN or inf); returns
  `example_sizes` (output size, activation bytes of one example)."""
  if not hasattr(xs, "shape") or xs.ndim < 2 or xs.shape[0] < 1:
    raise ValueError(f"xs must be a batch [N, ...] with N >= 1, got shape "
                     f"{getattr(xs, 'shape', type(xs).__name__)}")
  try:
    sizes = example_sizes(model, variables, xs.shape[1:], xs.dtype)
  except ValueError as e:
    raise ValueError(f"xs of shape {tuple(xs.shape)} does not fit the model "
                     f"{type(model).__name__}: {e}") from e
  if not isinstance(xs, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(xs))):
    raise NonFiniteError("xs contains non-finite values (NaN or inf)")
  return sizes
