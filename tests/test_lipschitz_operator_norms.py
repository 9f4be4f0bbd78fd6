"""Exact operator norms of dense / conv / pool maps against SVDs of explicit matrices,
and soundness of the certified conv upper bounds."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lipnorm.lipschitz import (conv_operator_norm, dense_operator_norm,
                               layer_operator_norms, pool_operator_norm)
from lipnorm.lipschitz.operator_norms import ConvGeometry, circulant_bound, patch_bound
from lipnorm.models import get_model
from lipnorm.models import structure as st
from lipschitz_testing import fast_compiles, random_variables  # noqa: F401


def _explicit_conv(kernel, in_shape, **conv_kw):
  """Matrix of flax's own nn.Conv applied to every basis vector, float64 SVD norm."""
  h, w, cin = in_shape
  conv = nn.Conv(kernel.shape[-1], kernel.shape[:2], use_bias=False, **conv_kw)
  n = h * w * cin
  cols = conv.apply({"params": {"kernel": jnp.asarray(kernel)}},
                    jnp.eye(n, dtype=jnp.float32).reshape(n, h, w, cin))
  mat = np.asarray(cols, np.float64).reshape(n, -1).T
  return float(np.linalg.svd(mat, compute_uv=False)[0]), mat.shape


CASES = [  # (in_shape, cout, kernel, strides, padding, groups)
    ((6, 6, 2), 4, (3, 3), 1, "SAME", 1),
    ((7, 6, 2), 4, (3, 3), 2, "SAME", 1),
    ((7, 7, 4), 4, (3, 3), 2, "VALID", 2),
    ((5, 5, 3), 6, (2, 2), 1, ((1, 0), (0, 2)), 3),
    ((8, 8, 2), 2, (3, 3), 1, "CIRCULAR", 1),
    ((4, 4, 2), 3, (5, 5), 1, "SAME", 1),
    ((6, 6, 4), 4, (1, 1), 2, "SAME", 4),
    ((9, 7, 2), 4, (3, 3), 3, 1, 2),
]


@pytest.mark.parametrize("in_shape,cout,ksize,strides,padding,groups", CASES)
def test_conv_norm_matches_explicit_matrix(in_shape, cout, ksize, strides, padding, groups):
  rng = np.random.default_rng(sum(in_shape) + cout)
  kernel = rng.normal(size=(*ksize, in_shape[2] // groups, cout)).astype(np.float32)
  ref, _ = _explicit_conv(kernel, in_shape, strides=strides, padding=padding,
                          feature_group_count=groups)
  kw = dict(strides=strides, padding=padding, feature_group_count=groups)
  exact = conv_operator_norm(kernel, in_shape, **kw)
  assert exact.exact and exact.method == "explicit"
  np.testing.assert_allclose(exact.estimate, ref, rtol=1e-9)
  assert ref <= exact.upper <= ref * (1 + 1e-9)
  # the matrix-free path: Lanczos (float32) to its tolerance, never above; a sound upper
  it = conv_operator_norm(kernel, in_shape, exact_max_dim=0, tol=1e-6, num_iters=200, **kw)
  assert not it.exact and it.method == "lanczos" and it.iterations > 0
  np.testing.assert_allclose(it.estimate, ref, rtol=1e-5)
  assert it.estimate <= ref * (1 + 1e-6) and it.upper >= ref * (1 - 1e-12)


def test_certified_conv_bounds_are_sound_on_random_layers():
  rng = np.random.default_rng(0)
  checked = 0
  while checked < 25:
    h, w = rng.integers(3, 8, 2)
    g = int(rng.choice([1, 2]))
    cin, cout = g * int(rng.integers(1, 3)), g * int(rng.integers(1, 3))
    k, s = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    pad = ["SAME", "VALID", tuple((int(a), int(b)) for a, b in rng.integers(0, 3, (2, 2)))][
        rng.integers(0, 3)]
    if pad == "VALID" and k > min(h, w):
      continue
    kernel = rng.normal(size=(k, k, cin // g, cout)).astype(np.float32)
    ref, shape = _explicit_conv(kernel, (h, w, cin), strides=s, padding=pad,
                                feature_group_count=g)
    if 0 in shape:
      continue
    geom = ConvGeometry.make((h, w), (k, k), s, pad)
    assert geom.out_hw[0] * geom.out_hw[1] * cout == shape[0]
    circ, _ = circulant_bound(kernel, geom, g)
    assert circ >= ref * (1 - 1e-12), (h, w, k, s, pad, g)
    assert patch_bound(kernel, geom, g) >= ref * (1 - 1e-12), (h, w, k, s, pad, g)
    checked += 1


def test_circulant_bound_is_exact_for_circular_padding():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
  ref, _ = _explicit_conv(kernel, (6, 6, 2), padding="CIRCULAR")
  circ, torus = circulant_bound(kernel, ConvGeometry.make((6, 6), (3, 3), 1, "CIRCULAR"))
  assert torus == (6, 6)
  np.testing.assert_allclose(circ, ref, rtol=1e-9)


def test_dense_norm_and_he_init_sanity():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(7, 5))
  np.testing.assert_allclose(dense_operator_norm(kernel).estimate,
                             np.linalg.svd(kernel, compute_uv=False)[0], rtol=1e-12)
  # docs/theory.md#he-init-expectation: square He layer W_ij ~ N(0, 2/d) has ||W||_2 ~ 2 sqrt(2)
  d = 400
  he = rng.normal(scale=math.sqrt(2 / d), size=(d, d))
  assert abs(dense_operator_norm(he).estimate / (2 * math.sqrt(2)) - 1) < 0.05


def test_pool_norms():
  # non-overlapping k x k average: 1/k; global average over P positions: 1/sqrt(P)
  avg = pool_operator_norm(st.Pool("avg", (2, 2), (2, 2), "VALID"), (6, 6, 3))
  np.testing.assert_allclose(avg.estimate, 0.5, rtol=1e-9)
  glob = pool_operator_norm(st.Pool("global_avg"), (4, 5, 3))
  np.testing.assert_allclose(glob.estimate, 1 / math.sqrt(20), rtol=1e-12)
  # overlapping average pool vs the explicit matrix of nn.avg_pool
  pool = st.Pool("avg", (3, 3), (1, 1), "SAME")
  n = 25
  mat = np.asarray(nn.avg_pool(jnp.eye(n).reshape(n, 5, 5, 1), (3, 3), (1, 1), "SAME"),
                   np.float64).reshape(n, -1).T
  res = pool_operator_norm(pool, (5, 5, 2))
  np.testing.assert_allclose(res.estimate, np.linalg.svd(mat, compute_uv=False)[0], rtol=1e-9)
  # overlapping max pool (3x3, stride 2): one pixel can be the max of 4 windows -> 2
  mx = pool_operator_norm(st.Pool("max", (3, 3), (2, 2), "VALID"), (7, 7, 1))
  assert mx.estimate == 2.0
  x = jnp.zeros((7, 7, 1)).at[2, 2, 0].set(1.0)
  jac = jax.jacfwd(lambda z: nn.max_pool(z[None], (3, 3), (2, 2), "VALID").ravel())(x)
  np.testing.assert_allclose(np.linalg.svd(np.asarray(jac).reshape(9, -1),
                                           compute_uv=False)[0], 2.0, rtol=1e-6)
  assert pool_operator_norm(st.Pool("max", (2, 2), (2, 2), "VALID"), (4, 4, 1)).estimate == 1


def test_layer_operator_norms_of_relu_net():
  model = get_model("relu_net", depth=3, width=8, num_classes=4)
  v = random_variables(model, (4, 4, 2))
  norms = layer_operator_norms(model, v, input_shape=(4, 4, 2))
  assert list(norms) == [("dense_0",), ("dense_1",), ("dense_2",)]
  for path, op in norms.items():
    k = np.asarray(v["params"][path[0]]["kernel"], np.float64)
    np.testing.assert_allclose(op.estimate, np.linalg.svd(k, compute_uv=False)[0], rtol=1e-9)
    assert op.upper >= op.estimate and op.exact
  assert norms[("dense_0",)].input_shape == (32,)
  with pytest.raises(ValueError, match="does not fit the model"):
    layer_operator_norms(model, v, input_shape=(5, 4, 2))


def test_bad_conv_arguments():
  k = np.ones((3, 3, 2, 4), np.float32)
  with pytest.raises(ValueError, match="feature_group_count=3"):
    conv_operator_norm(k, (5, 5, 2), feature_group_count=3)
  with pytest.raises(ValueError, match="padding='REFLECT'"):
    conv_operator_norm(k, (5, 5, 2), padding="REFLECT")
