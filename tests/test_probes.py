"""Layer probes against hand computation in float64 NumPy (forward pass written out)."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lipnorm.models import get_model
from lipnorm.models import structure as st
from lipnorm.normalizers import get_normalizer
from lipnorm.probes import LayerProber, flatten_probes, probe_layout


EPS = 1e-5


def _randomize(variables, seed):
  """Random gammas around 1 (some > sigma, some < sigma) and random running stats, so
  every statistic (and the amplifying fraction) is non-trivial. Drawn with NumPy (no XLA
  compile per leaf shape), one stream per leaf path (crc32: stable across processes)."""
  def leaf(path, x):
    name = path[-1].key
    rng = np.random.default_rng([seed, zlib.crc32(jax.tree_util.keystr(path).encode())])
    if name == "scale":
      return jnp.asarray(rng.uniform(-2.5, 2.5, x.shape), x.dtype)
    if name == "bias" or name == "mean":
      return jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype)
    if name == "var":
      return jnp.asarray(rng.uniform(0.2, 4.0, x.shape), x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(leaf, variables)


def _np_normalize(kind, z, p, stats, batch_mode, groups):
  """Reference normalizer on a dense input z `[N, C]`; returns (output, var, sigma2)."""
  n, c = z.shape
  gamma = np.asarray(p["scale"], np.float64)
  beta = np.asarray(p.get("bias", np.zeros(c)), np.float64)
  if kind == "batch":
    var = z.var(axis=0)
    if batch_mode:
      mean, sigma2 = z.mean(axis=0), var
    else:
      mean, sigma2 = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
    return gamma * (z - mean) / np.sqrt(sigma2 + EPS) + beta, var, sigma2
  if kind == "rms":
    ms = (z ** 2).mean(axis=1)
    return gamma * z / np.sqrt(ms[:, None] + EPS) + beta, z.var(axis=1), ms
  g = {"layer": 1, "instance": c}.get(kind, groups)
  zg = z.reshape(n, g, c // g)
  mean, var = zg.mean(axis=2), zg.var(axis=2)
  y = ((zg - mean[..., None]) / np.sqrt(var[..., None] + EPS)).reshape(n, c)
  return gamma * y + beta, var, var


def _np_probe(variables, x, depth, kind, batch_mode, groups):
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  bstats = jax.tree.map(lambda a: np.asarray(a, np.float64), variables.get("batch_stats", {}))
  h = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  out = {"preact_var": [], "frob": [], "var": [], "sigma2": [], "factor": [], "amp": []}
  for i in range(depth):
    p = params[f"dense_{i}"]
    z = h @ p["kernel"] + p.get("bias", 0.0)
    out["preact_var"].append(z.var(axis=0))
    out["frob"].append(np.sqrt((p["kernel"] ** 2).sum()))
    name = f"norm_{i}"
    if i < depth - 1 and name in params:
      gamma = params[name]["scale"]
      z, var, sigma2 = _np_normalize(kind, z, params[name], bstats.get(name), batch_mode, groups)
      out["var"].append(var)
      out["sigma2"].append(sigma2)
      sig = np.sqrt(sigma2 + EPS)
      if kind == "batch":
        ratios, amp = np.abs(gamma) / sig, sig < np.abs(gamma)
      else:
        s = sig.reshape(sig.shape[0], -1)
        gmax = np.abs(gamma).reshape(s.shape[1], -1).max(axis=1)   # per channel group
        ratios, amp = np.abs(gamma).max() / s, s < gmax[None, :]
      out["factor"].append(ratios.max())
      out["amp"].append(amp.mean())
    h = np.maximum(z, 0.0) if i < depth - 1 else z
  return out


@pytest.mark.parametrize("kind,batch_mode", [
    ("batch", False), ("batch", True), ("layer", False), ("group", False),
    ("rms", False), ("none", False)])   # instance on a dense net is refused (test_models)
@pytest.mark.slow
def test_probes_match_numpy_forward_pass(kind, batch_mode):
  depth, width, groups = 4, 8, 2
  opts = {"num_groups": groups} if kind == "group" else {}
  model = get_model("relu_net", depth=depth, width=width, norm=kind, norm_layers=[0, 2],
                    norm_options=opts)
  x = jax.random.normal(jax.random.key(1), (16, 3, 2))
  variables = _randomize(jax.jit(model.init)(jax.random.key(0), x), 2)
  mode = "batch" if batch_mode else "eval"
  probes = LayerProber(model, bn_modes=(mode,), spectral=False)(variables, x)
  assert list(probes) == [mode]
  p = probes[mode]
  ref = _np_probe(variables, x, depth, kind, batch_mode, groups)

  np.testing.assert_allclose(p.linear["frobenius"], ref["frob"], rtol=1e-5)
  np.testing.assert_allclose(p.linear["cumprod_frobenius"], np.cumprod(ref["frob"]), rtol=1e-5)
  for stat, fn in (("min", np.min), ("mean", np.mean), ("median", np.median)):
    np.testing.assert_allclose(p.linear[f"preact_var_{stat}"],
                               [fn(v) for v in ref["preact_var"]], rtol=2e-4, atol=1e-6)
  assert p.layout.num_norm == (0 if kind == "none" else 2)
  if kind == "none":
    return
  for stat, fn in (("min", np.min), ("mean", np.mean), ("median", np.median)):
    np.testing.assert_allclose(p.norm[f"var_{stat}"], [fn(v) for v in ref["var"]],
                               rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(p.norm["sigma2_min"], [v.min() for v in ref["sigma2"]],
                             rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(p.norm["factor"], ref["factor"], rtol=2e-4)
  np.testing.assert_allclose(p.norm["amplifying_fraction"], ref["amp"], atol=1e-6)
  np.testing.assert_allclose(p.norm["cumprod_var_mean"],
                             np.cumprod([v.mean() for v in ref["var"]]), rtol=2e-4)
  np.testing.assert_allclose(p.norm["cumprod_factor"], np.cumprod(ref["factor"]), rtol=2e-4)
  assert 0.0 < np.mean(ref["amp"]) < 1.0, "test data too easy: all or no groups amplify"


class _TinyConvNet(nn.Module):
  """conv -> BN -> relu -> conv (stride 2) -> global mean -> dense; with structure()."""
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, train=False, use_batch_stats=None):
    use_batch = train if use_batch_stats is None else use_batch_stats
    x = nn.Conv(4, (3, 3), use_bias=False, name="conv_0")(x)
    x = get_normalizer(self.norm)(name="norm_0")(x, use_batch_stats=use_batch)
    x = nn.relu(x)
    x = nn.Conv(6, (3, 3), strides=(2, 2), name="conv_1")(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(3, name="head")(x)

  def structure(self):
    return st.seq(st.Linear(("conv_0",), "conv"), st.Norm(("norm_0",), self.norm),
                  st.Activation("relu"), st.Linear(("conv_1",), "conv", strides=(2, 2)),
                  st.Activation("relu"), st.Pool("global_avg"), st.Linear(("head",)))


@pytest.mark.slow
def test_conv_probes_reduce_over_batch_and_positions():
  model = _TinyConvNet()
  x = jax.random.normal(jax.random.key(3), (5, 6, 6, 2))
  variables = _randomize(jax.jit(model.init)(jax.random.key(0), x), 4)
  layout = probe_layout(model.structure())
  assert layout.linear_normalized == (True, False, False)
  p = LayerProber(model, bn_modes=("eval", "batch"), spectral=False)(variables, x)
  k0 = np.asarray(variables["params"]["conv_0"]["kernel"], np.float64)
  z0 = np.asarray(jax.lax.conv_general_dilated(
      x, variables["params"]["conv_0"]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")), np.float64)
  var0 = z0.reshape(-1, 4).var(axis=0)
  np.testing.assert_allclose(p["eval"].linear["preact_var_mean"][0], var0.mean(), rtol=1e-4)
  np.testing.assert_allclose(p["batch"].norm["var_min"][0], var0.min(), rtol=1e-4)
  np.testing.assert_allclose(p["eval"].linear["frobenius"][0], np.sqrt((k0 ** 2).sum()),
                             rtol=1e-5)
  gamma = np.abs(np.asarray(variables["params"]["norm_0"]["scale"], np.float64))
  ra_var = np.asarray(variables["batch_stats"]["norm_0"]["var"], np.float64)
  np.testing.assert_allclose(p["eval"].norm["factor"][0], (gamma / np.sqrt(ra_var + EPS)).max(),
                             rtol=1e-5)
  np.testing.assert_allclose(p["batch"].norm["amplifying_fraction"][0],
                             np.mean(np.sqrt(var0 + EPS) < gamma), atol=1e-6)
  flat = flatten_probes(p)
  assert len(flat["eval/preact_var_mean"]) == 3 and len(flat["batch/norm_factor"]) == 1
  assert flat["weight_frobenius_product"] == pytest.approx(
      np.prod(p["eval"].linear["frobenius"]), rel=1e-9)


def test_prober_rejects_unknown_mode_and_skips_batch_mode_without_bn():
  model = get_model("relu_net", depth=3, width=8, norm="layer")
  with pytest.raises(ValueError, match="bn_modes"):
    LayerProber(model, bn_modes=("train",))
  assert LayerProber(model, bn_modes=("eval", "batch"), spectral=False).bn_modes == ("eval",)



def conv_matrix(kernel, in_shape, strides):
  """The SAME-padded conv's matrix `[out, in]` (float64), formed by autodiff."""
  f = lambda v: jax.lax.conv_general_dilated(   # noqa: E731
      v.reshape(1, *in_shape), kernel, strides, "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(-1)
  return np.asarray(jax.jacfwd(f)(jnp.zeros(int(np.prod(in_shape)))), np.float64)


@pytest.mark.slow
def test_spectral_norms_match_svd_of_the_explicit_linear_maps():
  """Dense: SVD of the kernel; conv: SVD of the conv map's matrix formed by autodiff at
  the layer's input size (6x6x2, SAME padding; 3x3x4 with stride 2 for conv_1)."""
  model = _TinyConvNet()
  x = jax.random.normal(jax.random.key(3), (5, 6, 6, 2))
  variables = _randomize(jax.jit(model.init)(jax.random.key(0), x), 4)
  p = LayerProber(model, spectral=True)(variables, x)["eval"]
  params = variables["params"]
  ref = [np.linalg.svd(conv_matrix(params["conv_0"]["kernel"], (6, 6, 2), (1, 1)),
                       compute_uv=False)[0],
         np.linalg.svd(conv_matrix(params["conv_1"]["kernel"], (6, 6, 4), (2, 2)),
                       compute_uv=False)[0],
         np.linalg.svd(np.asarray(params["head"]["kernel"], np.float64), compute_uv=False)[0]]
  np.testing.assert_allclose(p.linear["spectral"], ref, rtol=1e-4)
  np.testing.assert_allclose(p.linear["cumprod_spectral"], np.cumprod(ref), rtol=1e-4)


@pytest.mark.slow
def test_spectral_probes_warm_start_lanczos_from_the_previous_probe(monkeypatch):
  """conv_0 at 12x12x4 (576 inputs and outputs, above the explicit-matrix size) gets a
  Lanczos estimate; the next probe starts it from the last top singular vector and still
  matches the SVD of the new weights' explicit conv matrix."""
  from lipnorm import lipschitz
  model = _TinyConvNet()
  x = jax.random.normal(jax.random.key(3), (5, 12, 12, 4))
  v1 = _randomize(model.init(jax.random.key(0), x), 4)
  v2 = jax.tree.map(lambda a: a * 1.01 + 0.01, v1)   # the weights a few steps later
  starts = []
  real = lipschitz.layer_operator_norms

  def spy(*args, **kwargs):
    starts.append(kwargs.get("start_vectors"))
    return real(*args, **kwargs)
  monkeypatch.setattr(lipschitz, "layer_operator_norms", spy)
  prober = LayerProber(model, spectral=True)
  prober(v1, x)
  p2 = prober(v2, x)["eval"].linear["spectral"]
  prober(v2, x[:, :6, :6])    # another input size: a cold start, not a wrong-shape vector
  assert starts[0] is None and starts[2] is None
  assert list(starts[1]) == [("conv_0",)] and starts[1][("conv_0",)].shape == (12, 12, 4)
  ref = np.linalg.svd(conv_matrix(v2["params"]["conv_0"]["kernel"], (12, 12, 4), (1, 1)),
                      compute_uv=False)[0]
  np.testing.assert_allclose(p2[0], ref, rtol=1e-4)
