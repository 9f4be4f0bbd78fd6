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
from lipnorm.lipschitz.operator_norms import (ConvGeometry, _TopEigenvalue, circulant_bound,
                                              conv_apply, conv_matrix, patch_bound)
from lipnorm.models import get_model
from lipnorm.models import structure as st
from lipschitz_testing import random_variables  # noqa: F401



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
    ((7, 7, 3), 3, (3, 3), 2, "SAME", 3),      # depthwise, strided
    ((6, 5, 4), 8, (3, 3), 1, "SAME", 4),      # depthwise with multiplier 2
]


@pytest.mark.parametrize("in_shape,cout,ksize,strides,padding,groups", CASES)
@pytest.mark.slow
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


@pytest.mark.slow
def test_certified_conv_bounds_are_sound_on_random_layers():
  rng = np.random.default_rng(0)
  checked = 0
  while checked < 25:
    h, w = rng.integers(3, 8, 2)
    g = int(rng.choice([1, 2, 3]))
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


@pytest.mark.slow
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


def test_top_eigenvalue_cholesky_certificate_is_sound_and_tight():
  """The Cholesky route of `_TopEigenvalue` (used for symbols with >= 64 rows) against
  float64 eigvalsh: never below the max, at most ~1e-9 above; in several chunks, with
  exact ties (conjugate copies) and a top matrix the power steps may miss."""
  rng = np.random.default_rng(3)
  mats = rng.normal(size=(23, 12, 9)) + 1j * rng.normal(size=(23, 12, 9))
  mats[7] *= 1.01                       # a near-top matrix
  mats[15] = np.conj(mats[7])           # an exact tie
  mats[20] = 0                          # a zero symbol
  ref = max(np.linalg.svd(m, compute_uv=False)[0] ** 2 for m in mats)
  for chunk, candidates in [(23, 3), (4, 1), (1, 1)]:
    top = _TopEigenvalue(lambda i, j: mats[i:j], len(mats), chunk, min_dim=1,
                         candidates=candidates, power_steps=2).value()
    assert ref <= top <= ref * (1 + 1e-8), (chunk, candidates, top / ref - 1)


@pytest.mark.slow
def test_conv_matrix_needs_no_identity_of_the_input():
  """48x48x8 -> stride 2 -> 1 channel: eye(input_dim) would need 1.3 GB in float32; the
  matrix itself (576 x 18432) is built from the 576 output rows, and equals the conv."""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 3, 8, 1)).astype(np.float32)
  geom = ConvGeometry.make((48, 48), (3, 3), 2, "SAME")
  mat = conv_matrix(kernel, geom)
  assert mat.shape == (576, 48 * 48 * 8)
  x = rng.normal(size=(48, 48, 8)).astype(np.float32)
  np.testing.assert_allclose(mat @ x.reshape(-1).astype(np.float64),
                             np.asarray(conv_apply(jnp.asarray(kernel), jnp.asarray(x), geom),
                                        np.float64).reshape(-1), rtol=1e-5, atol=1e-4)
  # wide output side: columns instead (1 -> 4 channels, stride 1)
  small = ConvGeometry.make((5, 5), (3, 3), 1, "SAME")
  k2 = rng.normal(size=(3, 3, 1, 4)).astype(np.float32)
  ref, _ = _explicit_conv(k2, (5, 5, 1), padding="SAME")
  np.testing.assert_allclose(np.linalg.svd(conv_matrix(k2, small), compute_uv=False)[0], ref,
                             rtol=1e-9)
  # a matrix that itself would not fit: one clear error, at once
  big = ConvGeometry.make((64, 64), (3, 3), 1, "SAME")
  with pytest.raises(ValueError, match="GiB > max_bytes"):
    conv_matrix(np.ones((3, 3, 64, 64), np.float32), big)


def test_layer_operator_norms_of_a_cnn_certified_only():
  """estimate=False: no Lanczos; every conv's `upper` is sound against the explicit
  matrix, parallel threads give the same numbers as one."""
  model = get_model("cnn", num_classes=3, widths=(2, 3), norm="none")
  v = random_variables(model, (8, 8, 3))
  fast = layer_operator_norms(model, v, input_shape=(8, 8, 3), estimate=False,
                              exact_max_dim=0, workers=2)
  one = layer_operator_norms(model, v, input_shape=(8, 8, 3), estimate=False,
                             exact_max_dim=0, workers=1)
  exact = layer_operator_norms(model, v, input_shape=(8, 8, 3), exact_max_dim=10 ** 9)
  for path, op in fast.items():
    assert op.upper == one[path].upper
    if op.kind == "conv":
      assert op.method == "none" and math.isnan(op.estimate)
      assert op.upper >= exact[path].estimate * (1 - 1e-12)
  with pytest.raises(ValueError, match="workers=0"):
    layer_operator_norms(model, v, input_shape=(8, 8, 3), workers=0)


@pytest.mark.slow
def test_lanczos_warm_start_from_a_previous_vector():
  """A previous result's `vector` as `start` on slightly changed weights: the same
  value (vs the explicit matrix) in fewer iterations; convergence is reported."""
  rng = np.random.default_rng(7)
  kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  moved = kernel + 1e-3 * rng.normal(size=kernel.shape).astype(np.float32)
  ref, _ = _explicit_conv(moved, (8, 8, 3), padding="SAME")
  kw = dict(exact_max_dim=0, tol=1e-6, num_iters=150)
  cold = conv_operator_norm(kernel, (8, 8, 3), **kw)
  assert cold.converged and cold.vector.shape == (8, 8, 3)
  fresh = conv_operator_norm(moved, (8, 8, 3), **kw)
  warm = conv_operator_norm(moved, (8, 8, 3), start=cold.vector, **kw)
  assert warm.converged and warm.iterations < fresh.iterations
  np.testing.assert_allclose(warm.estimate, ref, rtol=1e-5)
  with pytest.raises(ValueError, match="start vector of shape"):
    conv_operator_norm(moved, (8, 8, 3), start=np.ones((8, 8, 4)), **kw)
  # through layer_operator_norms: start_vectors keyed by path
  model = get_model("cnn", num_classes=3, widths=(2,), norm="none")
  v = random_variables(model, (6, 6, 3))
  first = layer_operator_norms(model, v, input_shape=(6, 6, 3), exact_max_dim=0)
  starts = {p: r.vector for p, r in first.items() if r.vector is not None}
  assert starts
  again = layer_operator_norms(model, v, input_shape=(6, 6, 3), exact_max_dim=0,
                               start_vectors=starts)
  for p in starts:
    assert again[p].iterations <= 2 and again[p].converged
    np.testing.assert_allclose(again[p].estimate, first[p].estimate, rtol=1e-5)
