"""Model zoo: every model x every normalizer builds, applies (train and eval), has finite
gradients and a structure() that matches its variables; the full-size models have the
published parameter counts and layer widths (checked by shape alone, via eval_shape)."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from lipnorm.models import NormSpec, ReLUNet, get_model, model_names
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


# These tests compile many tiny graphs and run each once.


def _kernel_paths(params) -> list[tuple[str, ...]]:
  """Paths of every `kernel` leaf, in creation (= forward) order."""
  return [k[:-1] for k in traverse_util.flatten_dict(params) if k[-1] == "kernel"]


def _sown_paths(norm_stats) -> list[tuple[str, ...]]:
  return [k[:-1] for k in traverse_util.flatten_dict(norm_stats) if k[-1] == "mean"]


def _shapes(model, x_shape):
  return _trace_init(model, tuple(x_shape))[0]


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
@pytest.mark.slow
def test_model_x_normalizer(name, norm):
  kwargs, x_shape = TINY[name]
  model = get_model(name, norm=norm, **kwargs)
  x = jax.random.normal(jax.random.key(1), x_shape)

  # Eager init: its random draws are compiled once per kernel shape and reused across
  # normalizers; the rest is one compile. It also records the layer calls (no 2nd trace).
  calls = []
  with nn.intercept_methods(_call_recorder(calls)):
    variables = model.init(jax.random.key(0), x)
  assert set(variables) == ({"params", "batch_stats"} if norm == "batch" else {"params"})

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
  in_channels = {c[1]: c[2][-1] for c in calls}
  flat_params = traverse_util.flatten_dict(variables["params"])
  for layer in linear_nodes:
    kernel = flat_params[layer.path + ("kernel",)]
    if layer.kind == "conv":
      assert kernel.shape[2] * layer.feature_group_count == in_channels[layer.path]
    else:
      assert layer.kind == "dense" and kernel.shape[0] == in_channels[layer.path]


def _call_recorder(calls: list):
  """A flax method interceptor appending (conv | dense | norm, module path, input shape)
  of every layer call, in call order, to `calls`."""
  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__":
      kind = ("conv" if isinstance(m, nn.Conv) else "dense" if isinstance(m, nn.Dense)
              else "norm" if is_normalizer(m) else None)
      if kind is not None:
        calls.append((kind, tuple(m.path), tuple(args[0].shape)))
    return next_fun(*args, **kwargs)
  return record


@functools.lru_cache(maxsize=None)
def _trace_init(model, x_shape: tuple[int, ...]):
  """(variable shapes, layer calls) of `model.init` on a float32 batch of `x_shape`, from
  one shape-only trace (no compile). Memoized: models are hashable, and several tests
  trace the same one (tracing a full-size EfficientNet costs seconds)."""
  calls = []
  with nn.intercept_methods(_call_recorder(calls)):
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct(x_shape, jnp.float32))
  return shapes, tuple(calls)


def _layer_calls(model, x_shape) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """(conv | dense | norm, module path, input shape) of every layer call in call order."""
  return list(_trace_init(model, tuple(x_shape))[1])


# ---------------------------------------------------------------------------------------
# registry, parameter counts, published architectures

def test_registry_lists_models_and_rejects_bad_names():
  expected = {"relu_net", "mlp", "cnn", "resnet18", "resnet34", "resnet50", "efficientnet_b0",
              "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"}
  assert expected <= set(model_names())
  assert sorted(NORMS) == normalizer_names()
  with pytest.raises(ValueError, match="unknown model 'resnet19'; valid names: .*resnet18"):
    get_model("resnet19")
  with pytest.raises(ValueError, match=r"does not take \['depth'\]; valid: .*stage_sizes"):
    get_model("resnet18", depth=3)


# Reference counts (params only): torchvision resnet18/34/50 and the kuangliu CIFAR
# ResNet-18/50; keras.applications EfficientNet-B0/B3 trainable parameters.
PARAM_COUNTS = [
    ("resnet18", {}, 32, 11_173_962),
    ("resnet50", {}, 32, 23_520_842),
    ("resnet18", dict(stem="imagenet", num_classes=1000), 224, 11_689_512),
    ("resnet34", dict(stem="imagenet", num_classes=1000), 224, 21_797_672),
    ("resnet50", dict(stem="imagenet", num_classes=1000), 224, 25_557_032),
    ("efficientnet_b3", {}, 32, 10_711_602),
    ("efficientnet_b3", dict(num_classes=1000), 300, 12_233_232),
    ("efficientnet_b0", dict(num_classes=1000), 224, 5_288_548),
]


@pytest.mark.parametrize("name,kwargs,size,count", PARAM_COUNTS)
@pytest.mark.slow
def test_full_size_parameter_counts_and_structure(name, kwargs, size, count):
  model = get_model(name, norm="batch", **kwargs)
  x_shape = (1, size, size, 3)
  shapes = _shapes(model, x_shape)
  assert _param_count(shapes["params"]) == count
  # BN on every conv: conv kernels carry no bias; the head has one.
  flat = traverse_util.flatten_dict(shapes["params"])
  conv_paths = [k[:-1] for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 4]
  assert not [p for p in conv_paths if p + ("bias",) in flat
              and not p[-1] in ("reduce", "expand")]
  assert ("head", "bias") in flat
  # structure() lists exactly these kernels and one normalizer per conv slot, in order.
  structure = model.structure()
  calls = _layer_calls(model, x_shape)
  assert [l.path for l in st.linear_layers(structure)] == [c[1] for c in calls
                                                           if c[0] != "norm"]
  assert [n.path for n in st.norm_layers(structure)] == [c[1] for c in calls
                                                         if c[0] == "norm"]
  assert len(st.norm_layers(structure)) == len(conv_paths)
  assert _param_count(shapes["batch_stats"]) == 2 * sum(
      flat[p + ("scale",)].shape[0] for p in _norm_paths_with_params(shapes["params"]))


def _flat_shapes(model, x_shape):
  shapes = _shapes(model, x_shape)
  return shapes, traverse_util.flatten_dict(shapes["params"])


def test_resnet18_cifar_layout():
  model = get_model("resnet18")
  calls = _layer_calls(model, (2, 32, 32, 3))
  convs = {c[1]: c[2] for c in calls if c[0] == "conv"}
  # Stage s runs at 32 / 2**s with 64 * 2**s channels; 1x1 projection shortcuts exactly
  # where stride or width change (the first block of stages 1-3).
  for s, (hw, ch) in enumerate([(32, 64), (16, 128), (8, 256), (4, 512)]):
    assert convs[(f"stage{s}_block1", "conv_0")] == (2, hw, hw, ch)
  assert sorted(p[0] for p in convs if p[-1] == "shortcut_conv") == [
      "stage1_block0", "stage2_block0", "stage3_block0"]
  structure = model.structure()
  top = structure.layers
  residuals = [i for i, n in enumerate(top) if isinstance(n, st.Residual)]
  assert len(residuals) == 8
  assert all(top[i + 1] == st.Activation("relu", 1.0) for i in residuals)
  assert [top[i].shortcut is not None for i in residuals] == [False, False, True, False,
                                                              True, False, True, False]
  sc = top[residuals[2]].shortcut
  assert [type(n) for n in sc.layers] == [st.Linear, st.Norm]
  assert sc.layers[0].strides == (2, 2) and sc.layers[0].padding == "VALID"
  branch = top[residuals[2]].branch
  assert [l.strides for l in st.linear_layers(branch)] == [(2, 2), (1, 1)]
  assert st.linear_layers(branch)[0].padding == ((1, 1), (1, 1))
  assert not list(st.iter_nodes(structure, (st.Pool,)))[:-1]   # only the global pool


@pytest.mark.slow
def test_resnet_imagenet_stem_and_bottleneck():
  model = get_model("resnet50", stem="imagenet", num_classes=1000)
  calls = _layer_calls(model, (1, 224, 224, 3))
  convs = {c[1]: c[2] for c in calls if c[0] == "conv"}
  assert convs[("stage0_block0", "conv_0")] == (1, 56, 56, 64)      # 7x7/2 + maxpool/2
  assert convs[("stage3_block2", "conv_0")] == (1, 7, 7, 2048)
  structure = model.structure()
  assert structure.layers[3] == st.Pool("max", (3, 3), (2, 2), ((1, 1), (1, 1)))
  stem = structure.layers[0]
  assert stem.kind == "conv" and stem.strides == (2, 2) and stem.padding == ((3, 3), (3, 3))
  block = structure.layers[4]   # stage0_block0: 64 -> 256 needs a projection
  assert isinstance(block, st.Residual) and block.shortcut is not None
  # Bottleneck v1.5: the stride sits on the 3x3 conv.
  strided = [b for b in structure.layers if isinstance(b, st.Residual)][3]
  assert [l.strides for l in st.linear_layers(strided.branch)] == [(1, 1), (2, 2), (1, 1)]


def test_resnet_unnormalized_convs_have_biases():
  bn, flat_bn = _flat_shapes(get_model("resnet18", norm="batch"), (1, 32, 32, 3))
  none, flat_none = _flat_shapes(get_model("resnet18", norm="none"), (1, 32, 32, 3))
  conv_channels = sum(v.shape[-1] for k, v in flat_bn.items()
                      if k[-1] == "kernel" and v.ndim == 4)
  # Each conv trades its BN (scale + bias) for a conv bias.
  assert _param_count(none["params"]) == _param_count(bn["params"]) - conv_channels
  assert all(k[:-1] + ("bias",) in flat_none for k in flat_none if k[-1] == "kernel")
  assert "batch_stats" not in none


@pytest.mark.slow
def test_efficientnet_b3_matches_the_published_architecture():
  model = get_model("efficientnet_b3")
  assert (model.width_coefficient, model.depth_coefficient, model.dropout_rate) == (
      1.2, 1.4, 0.3)
  shapes, flat = _flat_shapes(model, (1, 32, 32, 3))
  assert flat[("stem_conv", "kernel")].shape == (3, 3, 3, 40)
  assert flat[("top_conv", "kernel")].shape == (1, 1, 384, 1536)
  stages = {}
  for k, v in flat.items():
    if k[-2:] == ("project_conv", "kernel"):
      stage = int(k[0].split("_")[0][len("stage"):])
      stages.setdefault(stage, []).append(v.shape[-1])
  assert [len(stages[s]) for s in range(7)] == [2, 3, 3, 5, 5, 6, 2]
  assert [stages[s][0] for s in range(7)] == [24, 32, 48, 96, 136, 232, 384]
  # Depthwise kernels [k, k, 1, C]; SE squeezes to a quarter of the block's input filters.
  assert flat[("stage2_block0", "depthwise_conv", "kernel")].shape == (5, 5, 1, 192)
  assert flat[("stage2_block0", "se", "reduce", "kernel")].shape == (192, 8)    # 32 / 4
  assert flat[("stage0_block0", "se", "reduce", "kernel")].shape == (40, 10)    # 40 / 4
  assert ("stage0_block0", "expand_conv", "kernel") not in flat                 # ratio 1
  structure = model.structure()
  residuals = [n for n in structure.layers if isinstance(n, st.Residual)]
  assert len(residuals) == 26 - 7 and all(r.shortcut is None for r in residuals)
  for conv in st.linear_layers(structure):
    if conv.path[-1] == "depthwise_conv":
      assert conv.feature_group_count == flat[conv.path + ("kernel",)].shape[-1]
  unbounded = list(st.iter_nodes(structure, (st.Unbounded,)))
  assert len(unbounded) == 26
  assert all("squeeze-excitation" in u.reason and u.path[-1] == "se" for u in unbounded)
  assert [l.path[-1] for l in st.linear_layers(unbounded[0].inner)] == ["reduce", "expand"]
  # Stochastic depth: block b drops with rate 0.2 * b / 26 (survival decays linearly).
  rates = [b[4] for b in model._plan()[1]]
  np.testing.assert_allclose(rates, 0.2 * np.arange(26) / 26)


def test_round_filters_and_repeats_match_the_reference():
  assert [round_filters(f, 1.1) for f in (32, 16, 24, 40, 80, 112, 192, 320, 1280)] == [
      32, 16, 24, 48, 88, 120, 208, 352, 1408]           # EfficientNet-B2
  assert round_filters(16, 1.2) == 24                     # bumped: 16 < 0.9 * 19.2
  assert [round_repeats(r, 1.4) for r in (1, 2, 3, 4)] == [2, 3, 5, 6]


def test_squeeze_excite_matches_numpy():
  x = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 5, 8)), np.float64)
  se = SqueezeExcite(2, "swish", nn.initializers.normal(1.0), jnp.float32)
  variables = se.init(jax.random.key(1), jnp.asarray(x, jnp.float32))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  p["reduce"]["bias"] = np.linspace(-1, 1, 2)
  p["expand"]["bias"] = np.linspace(-2, 2, 8)
  y = se.apply({"params": p}, jnp.asarray(x, jnp.float32))
  s = x.mean(axis=(1, 2)) @ p["reduce"]["kernel"] + p["reduce"]["bias"]
  s = s / (1 + np.exp(-s))
  g = 1 / (1 + np.exp(-(s @ p["expand"]["kernel"] + p["expand"]["bias"])))
  np.testing.assert_allclose(y, x * g[:, None, None, :], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_stochastic_depth_drops_whole_examples():
  ctx = ConvNormContext(frozenset(), get_normalizer("none"), False, True,
                        nn.initializers.he_normal(), jnp.float32)
  convs = (ConvSpec("depthwise_conv", "depthwise_norm", 4, (3, 3), (1, 1), "SAME", 0, 4),
           ConvSpec("project_conv", "project_norm", 4, (1, 1), (1, 1), "SAME", 1))
  block = MBConv(convs, 1, True, 0.5, ctx, "swish")
  x = jax.random.normal(jax.random.key(0), (64, 3, 3, 4))
  variables = block.init(jax.random.key(1), x)
  branch = block.apply(variables, x) - x                       # eval: identity + branch
  y = block.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  kept = np.all(np.isclose(y, x + branch / 0.5, atol=1e-5), axis=(1, 2, 3))
  dropped = np.all(np.isclose(y, x, atol=1e-6), axis=(1, 2, 3))
  assert np.all(kept ^ dropped)               # each example: whole branch kept or dropped
  assert 16 <= kept.sum() <= 48               # Binomial(64, 0.5), ~ +-4 sigma


# ---------------------------------------------------------------------------------------
# normalizer selection, defaults and errors

def _all_slots(name, kwargs, x_shape):
  model = get_model(name, norm="batch", norm_layers="all", **kwargs)
  return [c[1] for c in _layer_calls(model, x_shape) if c[0] == "norm"]


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("selection", ["first3", "list", "zero"])
def test_norm_layers_selects_exactly_the_requested_convs(name, selection):
  kwargs, x_shape = TINY[name]
  all_norms = _all_slots(name, kwargs, x_shape)
  n = len(all_norms)
  norm_layers, chosen = {"first3": (3, [0, 1, 2]), "list": ([n - 1, 1], [1, n - 1]),
                         "zero": (0, [])}[selection]
  model = get_model(name, norm="batch", norm_layers=norm_layers, **kwargs)
  expected = [all_norms[i] for i in chosen]
  shapes, flat = _flat_shapes(model, x_shape)
  assert [m.path for m in st.norm_layers(model.structure())] == expected
  assert _norm_paths_with_params(shapes["params"]) == set(expected)
  stats = traverse_util.flatten_dict(shapes.get("batch_stats", {}))
  assert {k[:-1] for k in stats} == set(expected)
  # A conv carries a bias exactly when its slot has no normalizer.
  conv_of_norm = {}
  for conv, norm in zip(_all_convs_with_slots(name, kwargs, x_shape), all_norms):
    conv_of_norm[norm] = conv
  for norm_path, conv_path in conv_of_norm.items():
    assert ((conv_path + ("bias",)) in flat) == (norm_path not in expected)


def _all_convs_with_slots(name, kwargs, x_shape):
  """Conv paths that carry a normalizer in the fully normalized model, in order."""
  calls = _layer_calls(get_model(name, norm="batch", **kwargs), x_shape)
  return [calls[i - 1][1] for i, c in enumerate(calls) if c[0] == "norm"]


@pytest.mark.slow
def test_groupnorm_default_groups_and_bad_num_groups():
  model = get_model("efficientnet_b0", norm="group")
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables, calls = _trace_init(model, x.shape)
  _, stats = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["norm_stats"]),
                            variables, x)
  calls = {c[1]: c[2][-1] for c in calls if c[0] == "norm"}
  flat = traverse_util.flatten_dict(stats["norm_stats"])
  groups = {k[:-1]: v.shape[1] for k, v in flat.items() if k[-1] == "mean"}
  assert groups.keys() == calls.keys()
  for path, channels in calls.items():
    assert groups[path] == max(d for d in divisors(channels) if d <= 32)
  assert {groups[p] for p in groups} >= {20, 24, 28, 30, 32}   # e.g. 40, 144, 112, 240, 96
  for name in ("resnet18", "efficientnet_b0", "cnn"):
    kwargs, x_shape = TINY[name]
    with pytest.raises(ValueError, match=r"num_groups=3 does not divide 8 channels; "
                                         r"allowed num_groups: \[1, 2, 4, 8\]"):
      get_model(name, norm="group", norm_options={"num_groups": 3}, **kwargs)


def test_use_batch_stats_overrides_train_for_bn_alone():
  model = get_model("cnn", widths=(8,), convs_per_stage=1, norm="batch")
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3)) * 3 + 1
  variables = model.init(jax.random.key(1), x)
  y_train, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  y_eval = model.apply(variables, x)
  y_batch, _ = model.apply(variables, x, use_batch_stats=True, mutable=["batch_stats"])
  y_frozen = model.apply(variables, x, train=True, use_batch_stats=False)
  np.testing.assert_allclose(y_batch, y_train, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y_frozen, y_eval, rtol=1e-5, atol=1e-6)
  assert not np.allclose(y_train, y_eval)


@pytest.mark.parametrize("name,kwargs,match", [
    ("resnet18", dict(block="wide"), r"block='wide'; allowed: \['basic', 'bottleneck'\]"),
    ("resnet18", dict(stem="tiny"), r"stem='tiny'; allowed: \['cifar', 'imagenet'\]"),
    ("resnet34", dict(stage_sizes=(2, 0)), r"stage_sizes=\(2, 0\)"),
    ("resnet50", dict(norm="batchnorm"), "unknown normalizer 'batchnorm'; valid names"),
    # ResNet-18: stem + 8 blocks x 2 convs + 3 projection shortcuts = 20 slots.
    ("resnet18", dict(norm_layers=99), r"norm_layers=99 .* must be in \[0, 20\]"),
    ("resnet18", dict(norm="layer", norm_options={"momentum": 0.9}),
     r"normalizer 'layer' does not take option\(s\) \['momentum'\]"),
    ("efficientnet_b1", dict(stem_stride=3), r"stem_stride=3; allowed: \[1, 2\]"),
    ("efficientnet_b2", dict(drop_connect_rate=1.0), "drop_connect_rate=1.0"),
    ("efficientnet_b0", dict(blocks=((1, 3, 1),)), "blocks="),
    ("efficientnet_b0", dict(norm_layers=[0, 0]), "distinct"),
    ("cnn", dict(widths=()), "widths"),
    ("cnn", dict(convs_per_stage=0), "convs_per_stage=0"),
    ("cnn", dict(downsample="max"), r"downsample='max'; allowed: \['avg_pool'"),
    ("cnn", dict(widths=(8, -4)), r"widths=\(8, -4\) must be a non-empty list of positive"),
    ("cnn", dict(num_classes=0), "CNN num_classes=0 must be a positive integer"),
    ("resnet18", dict(width=0), "ResNet width=0 must be a positive integer"),
    ("resnet18", dict(activation="relu6"), "unknown activation 'relu6'"),
    ("efficientnet_b0", dict(top_filters=-8), "top_filters=-8 must be a positive integer"),
    ("relu_net", dict(width=0), "ReLUNet width=0 must be a positive integer"),
    ("relu_net", dict(width=-3), "ReLUNet width=-3 must be a positive integer"),
    ("relu_net", dict(depth=0), "ReLUNet depth=0 must be a positive integer"),
    ("relu_net", dict(width=2.5), "ReLUNet width=2.5 must be a positive integer"),
    ("relu_net", dict(norm="group", width=12, norm_options={"num_groups": 5}),
     r"num_groups=5 does not divide 12 channels; allowed num_groups: \[1, 2, 3, 4, 6, 12\]"),
    ("relu_net", dict(norm="batch", norm_options={"axis_name": "batch"}),
     r"'batch' does not take option\(s\) \['axis_name'\]"),
])
def test_bad_options_raise_before_work(name, kwargs, match):
  """Impossible settings fail in `get_model` itself, with one line naming the field."""
  with pytest.raises(ValueError, match=match) as info:
    get_model(name, **kwargs)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs", [
    dict(norm="instance"),                                  # one feature per group
    dict(norm="group", width=16),                           # default: 16 groups of 1
    dict(norm="group", width=64, norm_options={"num_groups": 64}),
    dict(norm="layer", width=1),
])
def test_relu_net_refuses_single_feature_groups(kwargs):
  """Per-sample centering of a single feature outputs 0 whatever the input: a constant
  network. Refused at construction, not reported as a (meaningless) bound."""
  with pytest.raises(ValueError, match="single value .* network output is constant"):
    get_model("relu_net", depth=3, **{"width": 8, **kwargs})
  # the same normalizers on layers that are not degenerate are fine
  get_model("relu_net", depth=3, width=16, norm="group", norm_options={"num_groups": 4})
  get_model("relu_net", depth=1, width=8, norm="instance")      # no hidden layer
  get_model("relu_net", depth=3, width=8, norm="instance", norm_layers=0)
  get_model("cnn", widths=(8,), convs_per_stage=1, norm="instance")   # spatial groups


# ---------------------------------------------------------------------------------------
# hashability: models are jit static arguments

@pytest.mark.parametrize("name", ["relu_net", *TINY])
@pytest.mark.slow
def test_models_are_hashable_and_static_jit_arguments(name):
  kwargs, x_shape = TINY.get(name, (dict(depth=3, width=8), (2, 5)))
  make = lambda: get_model(name, norm="group", norm_layers=[0, 1],  # noqa: E731
                           norm_options={"num_groups": 2, "epsilon": 1e-3},
                           **{k: list(v) if isinstance(v, tuple) else v
                              for k, v in kwargs.items()})
  model = make()
  assert model.norm == NormSpec("group", (0, 1), (("epsilon", 1e-3), ("num_groups", 2)))
  assert hash(model) == hash(make()) and model == make()
  assert model != model.clone(norm=NormSpec.make("layer", [0, 1]))
  x = jax.random.normal(jax.random.key(0), x_shape)
  variables = jax.jit(lambda x: model.init(jax.random.key(1), x))(x)
  calls = []

  @functools.partial(jax.jit, static_argnums=0)
  def apply(m, v, x):
    calls.append(1)
    return m.apply(v, x)

  y = apply(model, variables, x)
  chex.assert_trees_all_close(apply(make(), variables, x), y)   # an equal model: no retrace
  assert len(calls) == 1
  spec = NormSpec.make("group", (0, 1), {"num_groups": 2, "epsilon": 1e-3})
  assert get_model(name, norm=spec, **kwargs) == get_model(
      name, norm="group", norm_layers=[0, 1], norm_options={"epsilon": 1e-3, "num_groups": 2},
      **kwargs)


def test_norm_spec_and_direct_construction():
  assert NormSpec.make("batch").epsilon == 1e-5
  assert NormSpec.make("layer", options={"epsilon": 1e-3}).epsilon == 1e-3
  with pytest.raises(ValueError, match="unknown normalizer 'bn'"):
    NormSpec.make("bn")
  assert ReLUNet(depth=2, width=4, norm="batch").norm == NormSpec("batch")
  with pytest.raises(ValueError, match="inside the NormSpec"):
    get_model("relu_net", norm=NormSpec("batch"), norm_layers=1)


@pytest.mark.slow
def test_bn_axis_name_syncs_statistics_and_keeps_the_parameters():
  """Training passes `bn_axis_name`: same variables, batch statistics over the axis."""
  model = get_model("relu_net", depth=2, width=6, num_classes=3, norm="batch")
  synced = get_model("relu_net", depth=2, width=6, num_classes=3, norm="batch",
                     bn_axis_name="batch")
  x = jax.random.normal(jax.random.key(0), (4, 3, 5)) * 2 + 1   # [devices, batch, features]
  v = model.init(jax.random.key(1), x[0])
  chex.assert_trees_all_equal_structs(v, synced.init(jax.random.key(1), x[0]))

  def run(m):
    return jax.pmap(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"])[0],
                    axis_name="batch", in_axes=(None, 0))(v, x)
  y_global = model.apply(v, x.reshape(12, 5), train=True, mutable=["batch_stats"])[0]
  np.testing.assert_allclose(run(synced).reshape(12, 3), y_global, rtol=1e-4, atol=1e-5)
  assert not np.allclose(run(model).reshape(12, 3), y_global, atol=1e-3)


@pytest.mark.parametrize("name", ["cnn", "resnet18", "efficientnet_b0"])
def test_conv_models_reject_flat_input(name):
  with pytest.raises(ValueError, match=r"NHWC.*\(2, 12\)"):
    _shapes(get_model(name, **TINY[name][0]), (2, 12))


# ---------------------------------------------------------------------------------------
# the small CNN

def test_cnn_strided_downsampling():
  model = get_model("cnn", widths=(8, 16, 16), convs_per_stage=1, downsample="strided_conv",
                    norm="batch")
  calls = [c for c in _layer_calls(model, (2, 16, 16, 3)) if c[0] == "norm"]
  assert [c[2] for c in calls] == [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 16)]
  convs = st.linear_layers(model.structure())[:-1]
  assert [c.strides for c in convs] == [(1, 1), (2, 2), (2, 2)]
  assert all(c.padding == "SAME" and c.feature_group_count == 1 for c in convs)
  assert [p.kind for p in st.iter_nodes(model.structure(), (st.Pool,))] == ["global_avg"]


def test_cnn_avg_pool_structure_and_biases():
  model = get_model("cnn", widths=(8, 16), convs_per_stage=2, norm="layer", norm_layers=[1, 2])
  nodes = st.iter_nodes(model.structure(), (st.Linear, st.Norm, st.Pool, st.Activation))
  kinds = [(type(n).__name__, getattr(n, "path", getattr(n, "kind", None))) for n in nodes]
  assert kinds == [
      ("Linear", ("conv_0",)), ("Activation", None),
      ("Linear", ("conv_1",)), ("Norm", ("norm_1",)), ("Activation", None),
      ("Pool", "avg"),
      ("Linear", ("conv_2",)), ("Norm", ("norm_2",)), ("Activation", None),
      ("Linear", ("conv_3",)), ("Activation", None),
      ("Pool", "global_avg"), ("Linear", ("head",))]
  calls = {c[1]: c[2] for c in _layer_calls(model, (2, 8, 8, 3))}
  assert calls[("conv_2",)] == (2, 4, 4, 8)              # after the 2x2 average pool
  _, flat = _flat_shapes(model, (1, 8, 8, 3))
  assert {k[0] for k in flat if k[-1] == "bias" and k[0].startswith("conv")} == {
      "conv_0", "conv_3"}


def test_cnn_he_normal_init():
  model = get_model("cnn", widths=(8, 32), convs_per_stage=1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  k = np.asarray(variables["params"]["conv_1"]["kernel"])
  assert k.shape == (3, 3, 8, 32)                      # 2304 draws: std within ~2%
  np.testing.assert_allclose(k.std(), math.sqrt(2.0 / (3 * 3 * 8)), rtol=0.1)
