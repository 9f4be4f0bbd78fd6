"""The conv implementation switch (lipnorm.models.conv): the "matmul" path against
`lax.conv_general_dilated` (through `nn.Conv`) on every conv shape of the model zoo, in
values, gradients and the transformations the Lipschitz code uses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lipnorm.models import get_model
from lipnorm.models.conv import CONV_IMPLS, Conv, conv2d, resolve_conv_impl
from lipschitz_testing import enable_x64

# (input NHWC, kernel (kh, kw), features, strides, padding, feature_group_count): each
# kind of conv the zoo builds, at a few channels.
ZOO_CONVS = {
    "cnn_3x3_same": ((2, 6, 6, 3), (3, 3), 4, (1, 1), "SAME", 1),
    "cnn_3x3_same_stride2": ((2, 6, 6, 4), (3, 3), 5, (2, 2), "SAME", 1),
    "resnet_3x3_explicit": ((2, 5, 5, 3), (3, 3), 4, (1, 1), ((1, 1), (1, 1)), 1),
    "resnet_3x3_explicit_stride2": ((2, 7, 7, 3), (3, 3), 4, (2, 2), ((1, 1), (1, 1)), 1),
    "resnet_imagenet_stem_7x7_stride2": ((1, 9, 9, 3), (7, 7), 4, (2, 2), ((3, 3), (3, 3)),
                                         1),
    "resnet_1x1_projection_stride2": ((2, 6, 6, 4), (1, 1), 6, (2, 2), "VALID", 1),
    "resnet_1x1_valid": ((2, 4, 4, 4), (1, 1), 3, (1, 1), "VALID", 1),
    "effnet_stem_3x3_same_stride2_odd": ((2, 7, 7, 3), (3, 3), 4, (2, 2), "SAME", 1),
    "effnet_1x1_same": ((2, 4, 4, 4), (1, 1), 8, (1, 1), "SAME", 1),
    "effnet_depthwise_3x3": ((2, 5, 5, 6), (3, 3), 6, (1, 1), "SAME", 6),
    "effnet_depthwise_5x5_stride2": ((2, 7, 7, 4), (5, 5), 4, (2, 2), "SAME", 4),
    "depthwise_multiplier_2": ((2, 5, 5, 3), (3, 3), 6, (1, 1), "SAME", 3),
    "grouped_2_groups": ((2, 5, 5, 4), (3, 3), 6, (2, 2), "SAME", 2),
    "valid_3x3": ((2, 6, 5, 3), (3, 3), 2, (1, 1), "VALID", 1),
    "asymmetric_explicit": ((1, 6, 6, 2), (3, 2), 3, (1, 2), ((2, 0), (0, 1)), 1),
}


def _modules(spec, impl="matmul"):
  _, kernel, features, strides, padding, groups = spec
  kw = dict(strides=strides, padding=padding, feature_group_count=groups)
  return (Conv(features, kernel, conv_impl=impl, **kw), nn.Conv(features, kernel, **kw))


@pytest.mark.parametrize("name", sorted(ZOO_CONVS))
@pytest.mark.slow
def test_matmul_conv_equals_lax_in_values_and_gradients(name):
  spec = ZOO_CONVS[name]
  with enable_x64():
    ours, ref = _modules(spec)
    x = jax.random.normal(jax.random.PRNGKey(0), spec[0], jnp.float64)
    params = ref.init(jax.random.PRNGKey(1), x)
    y_ref = jax.jit(ref.apply)(params, x)
    y = jax.jit(ours.apply)(params, x)
    assert y.shape == y_ref.shape and y.dtype == jnp.float64
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    cot = jax.random.normal(jax.random.PRNGKey(2), y.shape, jnp.float64)

    def loss(module):
      return lambda p, v: jnp.sum(jnp.tanh(module.apply(p, v)) * cot)

    g = jax.jit(jax.grad(loss(ours), (0, 1)))(params, x)
    g_ref = jax.jit(jax.grad(loss(ref), (0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_same_parameter_tree_and_initial_values_as_nn_conv():
  for name, spec in ZOO_CONVS.items():
    ours, ref = _modules(spec)
    x = jnp.zeros(spec[0])
    p, p_ref = (jax.eval_shape(m.init, jax.random.PRNGKey(3), x) for m in (ours, ref))
    assert jax.tree.structure(p) == jax.tree.structure(p_ref)
    assert jax.tree.leaves(p) == jax.tree.leaves(p_ref)   # shapes and dtypes
    if name in ("resnet_3x3_explicit", "effnet_depthwise_3x3"):  # same RNG use, same values
      p, p_ref = (jax.jit(m.init)(jax.random.PRNGKey(3), x) for m in (ours, ref))
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["resnet_3x3_explicit_stride2", "effnet_depthwise_3x3",
                                  "grouped_2_groups"])
def test_forward_mode_transpose_and_hvp_match_lax(name):
  shape, kernel, features, strides, padding, groups = ZOO_CONVS[name]
  with enable_x64():
    x = jax.random.normal(jax.random.PRNGKey(4), shape, jnp.float64)
    k = jax.random.normal(jax.random.PRNGKey(5),
                          kernel + (shape[-1] // groups, features), jnp.float64)
    dx = jax.random.normal(jax.random.PRNGKey(6), shape, jnp.float64)

    def f(impl):
      return lambda v, w: conv2d(v, w, strides, padding, groups, impl)

    ref = lambda v, w: jax.lax.conv_general_dilated(  # noqa: E731
        v, w, strides, padding if isinstance(padding, str) else list(padding),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    jvp = jax.jit(lambda conv: jax.jvp(lambda v: conv(v, k), (x,), (dx,)), static_argnums=0)
    y, ty = jvp(f("matmul"))
    y_ref, ty_ref = jvp(ref)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    np.testing.assert_allclose(ty, ty_ref, atol=1e-12)
    # The transpose of the linear map x -> conv(x, k) (what power iteration uses).
    (xt,) = jax.jit(jax.linear_transpose(lambda v: f("matmul")(v, k), x))(y)
    (xt_ref,) = jax.jit(jax.linear_transpose(lambda v: ref(v, k), x))(y)
    np.testing.assert_allclose(xt, xt_ref, rtol=1e-10, atol=1e-10)
    # Hessian-vector product of a nonlinear loss in the kernel: forward over reverse.
    def hvp(conv):
      loss = lambda w: jnp.sum(jnp.tanh(conv(x, w)) ** 2)  # noqa: E731
      return jax.jit(lambda w: jax.jvp(jax.grad(loss), (w,), (jnp.ones_like(w),))[1])(k)
    np.testing.assert_allclose(hvp(f("matmul")), hvp(ref), rtol=1e-9, atol=1e-9)
    # jacfwd and jacrev agree on the small map.
    small = lambda v: f("matmul")(v, k).ravel()  # noqa: E731
    np.testing.assert_allclose(jax.jit(jax.jacfwd(small))(x), jax.jit(jax.jacrev(small))(x),
                               atol=1e-12)


def test_auto_picks_matmul_for_grouped_convs_on_cpu_and_xla_elsewhere(monkeypatch):
  assert jax.default_backend() == "cpu"
  assert resolve_conv_impl("auto", feature_group_count=8) == "matmul"
  assert resolve_conv_impl("auto") == "xla"
  assert resolve_conv_impl("xla", feature_group_count=8) == "xla"
  assert resolve_conv_impl("matmul") == "matmul"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert resolve_conv_impl("auto", feature_group_count=8) == "xla"
  assert resolve_conv_impl("matmul") == "matmul"


def test_invalid_conv_impl_names_the_valid_ones():
  msg = r"conv_impl='cudnn'; valid names: auto, xla, matmul"
  assert CONV_IMPLS == ("auto", "xla", "matmul")
  with pytest.raises(ValueError, match=msg):
    conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), conv_impl="cudnn")
  with pytest.raises(ValueError, match=msg):
    Conv(2, (3, 3), conv_impl="cudnn").init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))
  for model in ("cnn", "resnet18", "efficientnet_b0"):
    with pytest.raises(ValueError, match=msg):
      get_model(model, conv_impl="cudnn")


TINY_MBCONV_BLOCKS = ((1, 3, 2, 1, 32, 32), (1, 5, 1, 4, 32, 32))
TINY_MODELS = {
    "cnn": (dict(widths=(4, 8), downsample="strided_conv"), (2, 8, 8, 3)),
    "resnet18": (dict(stage_sizes=(1, 1), width=4), (2, 8, 8, 3)),
    "resnet50": (dict(stage_sizes=(1,), width=2, stem="imagenet"), (2, 16, 16, 3)),
    "efficientnet_b0": (dict(blocks=TINY_MBCONV_BLOCKS, width_coefficient=0.25,
                             top_filters=32, stem_stride=2), (2, 9, 9, 3)),
}


@pytest.mark.parametrize("name", [
    "cnn", "resnet18", pytest.param("resnet50", marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_model_forward_and_gradient_with_matmul_equal_xla(name):
  kwargs, shape = TINY_MODELS[name]
  xla = get_model(name, conv_impl="xla", **kwargs)
  mm = get_model(name, conv_impl="matmul", **kwargs)
  assert mm.structure() == xla.structure()
  x = jax.random.normal(jax.random.PRNGKey(7), shape)
  variables = jax.jit(xla.init)(jax.random.PRNGKey(8), x)
  assert (jax.tree.structure(jax.eval_shape(mm.init, jax.random.PRNGKey(8), x))
          == jax.tree.structure(variables))

  def loss(model):
    def f(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(9)})
      return jnp.sum(jnp.sin(out))
    return jax.value_and_grad(f)

  (v, g), (v_ref, g_ref) = (jax.jit(loss(m))(variables["params"]) for m in (mm, xla))
  np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
