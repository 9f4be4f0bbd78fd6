"""Model zoo: every model x every normalizer builds, applies (train and eval), has finite
gradients and a structure() that matches its variables; the full-size models have the
published parameter counts and layer widths (checked by shape alone, via eval_shape)."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from lipnorm.models import get_model, model_names
from lipnorm.models import structure as st
from lipnorm.models.common import ConvNormContext, ConvSpec
from lipnorm.models.efficientnet import MBConv, SqueezeExcite, round_filters, round_repeats
from lipnorm.normalizers import divisors, get_normalizer, is_normalizer, normalizer_names

NORMS = ["none", "batch", "layer", "group", "instance", "rms"]

# Tiny configurations (a few blocks, 8-64 channels, 8x8 / 16x16 inputs) that still
# cover every code path: both downsamplings, both ResNet blocks and stems, MBConv with
# and without expansion, strided and residual, with stochastic depth.
TINY_MBCONV_BLOCKS = ((1, 3, 2, 1, 32, 32), (1, 3, 1, 4, 32, 32))
TINY = {
    "cnn": (dict(widths=(8, 16), convs_per_stage=2), (4, 8, 8, 3)),
    "resnet18": (dict(stage_sizes=(1, 1), width=8), (4, 8, 8, 3)),
    "resnet50": (dict(stage_sizes=(1,), width=4, stem="imagenet"), (4, 16, 16, 3)),
    "efficientnet_b0": (dict(blocks=TINY_MBCONV_BLOCKS, width_coefficient=0.25,
                             top_filters=64, stem_stride=1), (4, 8, 8, 3)),
}
HAS_DROPOUT = {"efficientnet_b0"}


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  """These tests compile many tiny graphs and run each once: skip XLA's expensive
  optimization passes (results are the same up to float rounding)."""
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _kernel_paths(params) -> list[tuple[str, ...]]:
  """Paths of every `kernel` leaf, in creation (= forward) order."""
  return [k[:-1] for k in traverse_util.flatten_dict(params) if k[-1] == "kernel"]


def _sown_paths(norm_stats) -> list[tuple[str, ...]]:
  return [k[:-1] for k in traverse_util.flatten_dict(norm_stats) if k[-1] == "mean"]


def _shapes(model, x_shape):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x_shape))


def _param_count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _norm_paths_with_params(params) -> set[tuple[str, ...]]:
  """Modules whose variables are a normalizer's (`scale` and no `kernel`)."""
  flat = traverse_util.flatten_dict(params)
  return {k[:-1] for k in flat if k[-1] == "scale"}


# ---------------------------------------------------------------------------------------
# every model x every normalizer

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", list(TINY))
def test_model_x_normalizer(name, norm):
  kwargs, x_shape = TINY[name]
  model = get_model(name, norm=norm, **kwargs)
  x = jax.random.normal(jax.random.key(1), x_shape)

  # Eager init: its random draws are compiled once per kernel shape and reused across
  # normalizers; the rest is one compile.
  variables = model.init(jax.random.key(0), x)

  @jax.jit
  def run(variables, x):
    y_eval, stats = model.apply(variables, x, mutable=["norm_stats"])

    def loss(params, key):
      logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                    mutable=["batch_stats"], rngs={"dropout": key})
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), (logits, updates)

    grads, (y_train, updates) = jax.grad(loss, has_aux=True)(variables["params"],
                                                              jax.random.key(2))
    y_train2 = (loss(variables["params"], jax.random.key(3))[1][0] if name in HAS_DROPOUT
                else y_train)
    return y_eval, stats, y_train, y_train2, updates, grads

  y_eval, stats, y_train, y_train2, updates, grads = run(variables, x)
  for y in (y_eval, y_train):
    chex.assert_shape(y, (x_shape[0], 10))
    chex.assert_tree_all_finite(y)
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_equal_shapes(grads, variables["params"])
  assert sum(float(jnp.sum(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads)) > (
      len(jax.tree.leaves(grads)) // 2)
  # Dropout / stochastic depth act in train mode only, and only where the model has them.
  assert (not np.allclose(y_train, y_train2)) == (name in HAS_DROPOUT)
  if norm == "batch":
    # Train mode normalizes with batch statistics and moves every running statistic.
    assert not np.allclose(y_train, y_eval)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"],
                         variables["batch_stats"])
    assert all(jax.tree.leaves(moved))
  else:
    assert "batch_stats" not in variables
    if name not in HAS_DROPOUT:
      np.testing.assert_allclose(y_train, y_eval, rtol=1e-5, atol=1e-5)

  # structure(): exactly the model's kernels and normalizers, in forward (call) order.
  structure = model.structure()
  calls = _layer_calls(model, x)
  linear_nodes = st.linear_layers(structure)
  assert [l.path for l in linear_nodes] == [c[1] for c in calls if c[0] != "norm"]
  assert {l.path for l in linear_nodes} == set(_kernel_paths(variables["params"]))
  norm_nodes = st.norm_layers(structure)
  assert [n.path for n in norm_nodes] == [c[1] for c in calls if c[0] == "norm"]
  assert {n.path for n in norm_nodes} == set(_sown_paths(stats.get("norm_stats", {})))
  assert all(n.kind == norm and n.epsilon == 1e-5 for n in norm_nodes)
  assert bool(norm_nodes) == (norm != "none")
  if norm not in ("none", "rms"):   # RMS has a scale but no bias by default
    assert _norm_paths_with_params(variables["params"]) == {n.path for n in norm_nodes}
  # Each node's kind / feature_group_count matches its kernel and the channels it sees.
  in_channels = {c[1]: c[2] for c in calls}
  flat_params = traverse_util.flatten_dict(variables["params"])
  for layer in linear_nodes:
    kernel = flat_params[layer.path + ("kernel",)]
    if layer.kind == "conv":
      assert kernel.shape[2] * layer.feature_group_count == in_channels[layer.path]
    else:
      assert layer.kind == "dense" and kernel.shape[0] == in_channels[layer.path]


def _layer_calls(model, x) -> list[tuple[str, tuple[str, ...], int]]:
  """(conv | dense | norm, module path, input channels) of every layer call in call
  order, recorded by a method interceptor while tracing init (no compile)."""
  calls = []

  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__":
      kind = ("conv" if isinstance(m, nn.Conv) else "dense" if isinstance(m, nn.Dense)
              else "norm" if is_normalizer(m) else None)
      if kind is not None:
        calls.append((kind, tuple(m.path), args[0].shape[-1]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), x)
  return calls
