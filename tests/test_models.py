"""Model zoo: every model x every normalizer builds, applies (train and eval), has finite
gradients, exposes a structure() that matches its variables, and the full-size models
have the published parameter counts."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lipnorm.models import get_model, model_names
from lipnorm.models import structure as st
from lipnorm.normalizers import normalizer_names

NORMS = ["none", "batch", "layer", "group", "instance", "rms"]

# Tiny configurations: every model x normalizer runs in well under a second.
TINY = {
    "cnn": dict(widths=(8, 16), convs_per_stage=2),
}
INPUT_SHAPE = {"cnn": (4, 8, 8, 3)}


def _kernel_paths(params) -> list[tuple[str, ...]]:
  """Paths of every `kernel` leaf in creation (= forward) order."""
  flat = traverse_util.flatten_dict(params)
  return [k[:-1] for k in flat if k[-1] == "kernel"]


def _sown_paths(norm_stats) -> list[tuple[str, ...]]:
  flat = traverse_util.flatten_dict(norm_stats)
  return [k[:-1] for k in flat if k[-1] == "mean"]


def _param_count(model, x_shape) -> int:
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x_shape))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))


def _exercise(model, x_shape, norm):
  """init; eval and train apply; finite grads; structure vs variables."""
  x = jax.random.normal(jax.random.key(1), x_shape)
  variables = model.init(jax.random.key(0), x)
  y_eval, stats = model.apply(variables, x, mutable=["norm_stats"])
  chex.assert_shape(y_eval, (x_shape[0], 10))
  chex.assert_tree_all_finite(y_eval)
  rngs = {"dropout": jax.random.key(2)}
  y_train, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
  chex.assert_shape(y_train, (x_shape[0], 10))
  chex.assert_tree_all_finite(y_train)
  if norm == "batch":
    # Train mode normalizes with batch statistics and moves the running statistics.
    assert not np.allclose(y_train, y_eval)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"],
                           variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
  else:
    assert "batch_stats" not in variables

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"], rngs=rngs)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  grads = jax.grad(loss)(variables["params"])
  chex.assert_tree_all_finite(grads)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))

  structure = model.structure()
  assert [l.path for l in st.linear_layers(structure)] == _kernel_paths(variables["params"])
  norm_nodes = st.norm_layers(structure)
  assert all(n.kind == norm for n in norm_nodes)
  assert [n.path for n in norm_nodes] == _sown_paths(stats.get("norm_stats", {}))
  if norm == "none":
    assert norm_nodes == []
  else:
    assert norm_nodes
  return variables, structure


def test_registry_lists_models_and_rejects_bad_names():
  assert {"relu_net", "cnn"} <= set(model_names())
  with pytest.raises(ValueError, match="valid names: .*cnn"):
    get_model("vgg_nope")
  with pytest.raises(ValueError, match=r"does not take \['depthh'\]"):
    get_model("cnn", depthh=3)


@pytest.mark.parametrize("norm", NORMS)
def test_cnn_every_normalizer(norm):
  assert sorted(NORMS) == normalizer_names()
  model = get_model("cnn", norm=norm, **TINY["cnn"])
  _exercise(model, INPUT_SHAPE["cnn"], norm)


def test_cnn_strided_downsampling_and_structure():
  model = get_model("cnn", widths=(8, 16, 16), convs_per_stage=1, downsample="strided_conv",
                    norm="batch")
  x = jnp.zeros((2, 16, 16, 3))
  variables, structure = _exercise(model, x.shape, "batch")
  convs = [l for l in st.linear_layers(structure) if l.kind == "conv"]
  assert [c.strides for c in convs] == [(1, 1), (2, 2), (2, 2)]
  assert all(c.padding == "SAME" and c.feature_group_count == 1 for c in convs)
  assert not [n for n in st.iter_nodes(structure, (st.Pool,)) if n.kind == "avg"]
  # The strided convs really halve the resolution: 16 -> 8 -> 4 channels-last maps.
  _, inter = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  shapes = {k[0]: v[0].shape for k, v in
            traverse_util.flatten_dict(inter["intermediates"], keep_empty_nodes=False).items()
            if k[0].startswith("conv_")}
  assert shapes == {"conv_0": (2, 16, 16, 8), "conv_1": (2, 8, 8, 16), "conv_2": (2, 4, 4, 16)}


def test_cnn_avg_pool_structure_and_biases():
  model = get_model("cnn", widths=(8, 16), convs_per_stage=2, norm="layer", norm_layers=[1, 2])
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  nodes = st.iter_nodes(model.structure(), (st.Linear, st.Norm, st.Pool, st.Activation))
  kinds = [(type(n).__name__, getattr(n, "path", getattr(n, "kind", None))) for n in nodes]
  assert kinds == [
      ("Linear", ("conv_0",)), ("Activation", None),
      ("Linear", ("conv_1",)), ("Norm", ("norm_1",)), ("Activation", None),
      ("Pool", "avg"),
      ("Linear", ("conv_2",)), ("Norm", ("norm_2",)), ("Activation", None),
      ("Linear", ("conv_3",)), ("Activation", None),
      ("Pool", "global_avg"), ("Linear", ("head",))]
  p = variables["params"]
  # No bias before a normalizer; a bias everywhere else.
  assert "bias" in p["conv_0"] and "bias" in p["conv_3"] and "bias" in p["head"]
  assert "bias" not in p["conv_1"] and "bias" not in p["conv_2"]
  assert set(p) == {"conv_0", "conv_1", "norm_1", "conv_2", "norm_2", "conv_3", "head"}


@pytest.mark.parametrize("norm_layers,expected", [
    ("all", {0, 1, 2, 3}), (0, set()), (2, {0, 1}), ([3, 1], {1, 3})])
def test_cnn_norm_layer_selection(norm_layers, expected):
  model = get_model("cnn", widths=(8, 16), convs_per_stage=2, norm="batch",
                    norm_layers=norm_layers)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  got = {int(k.split("_")[1]) for k in shapes["params"] if k.startswith("norm_")}
  assert got == expected
  assert {int(k.split("_")[1]) for k in shapes.get("batch_stats", {})} == expected
  assert [n.path for n in st.norm_layers(model.structure())] == [
      (f"norm_{i}",) for i in sorted(expected)]
  for i in range(4):   # bias exactly on the unnormalized convs
    assert ("bias" in shapes["params"][f"conv_{i}"]) == (i not in expected)


def test_cnn_he_normal_init():
  model = get_model("cnn", widths=(64, 64), convs_per_stage=1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  k = np.asarray(variables["params"]["conv_1"]["kernel"])
  fan_in = 3 * 3 * 64
  assert k.shape == (3, 3, 64, 64)
  np.testing.assert_allclose(k.std(), np.sqrt(2.0 / fan_in), rtol=0.1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(widths=()), "widths"),
    (dict(convs_per_stage=0), "convs_per_stage=0"),
    (dict(downsample="max"), "downsample='max'.*avg_pool"),
    (dict(norm="batchnorm"), "unknown normalizer 'batchnorm'.*valid names"),
    (dict(norm="batch", norm_layers=7), "norm_layers=7"),
    (dict(norm="group", norm_options={"num_groups": 3}), "num_groups=3 does not divide 8"),
    (dict(norm="batch", norm_options={"num_groups": 2}), "does not take option"),
])
def test_cnn_bad_options(kwargs, match):
  model = get_model("cnn", **{"widths": (8, 16), **kwargs})
  with pytest.raises(ValueError, match=match):
    model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_cnn_rejects_flat_input():
  model = get_model("cnn", widths=(8,))
  with pytest.raises(ValueError, match=r"NHWC.*\(2, 12\)"):
    model.init(jax.random.key(0), jnp.zeros((2, 12)))
