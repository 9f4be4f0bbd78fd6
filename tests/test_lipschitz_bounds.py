"""upper_bound: exact factors, residual / unbounded composition, and soundness against
local Jacobian norms on many random networks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lipnorm.lipschitz import (input_lipschitz, jacobian_spectral_norm, merge_stats,
                               normalizer_stats, upper_bound)
from lipnorm.lipschitz.bounds import normalizer_factor
from lipnorm.models import get_model
from lipnorm.models import structure as st
from lipnorm.normalizers import BatchNorm, lipschitz_factor
from lipschitz_testing import random_variables, x64  # noqa: F401


NORMS = [("none", None), ("batch", None), ("layer", None), ("group", {"num_groups": 2}),
         ("rms", None)]


def _svd(k):
  return float(np.linalg.svd(np.asarray(k, np.float64), compute_uv=False)[0])


@pytest.mark.parametrize("norm,opts", NORMS)
def test_bound_is_sound_on_random_relu_nets(norm, opts):
  """Eval mode, 8 seeds: normalized bound >= every local constant on the data the
  stats came from; sequential nets: normalized = product x normalizer factors."""
  model = get_model("relu_net", depth=4, width=12, num_classes=5, norm=norm,
                    norm_options=opts)
  bn = "eval" if norm == "batch" else None
  for seed in range(8):
    xs = 2.0 * jax.random.normal(jax.random.key(100 + seed), (16, 7))
    v = random_variables(model, (7,), seed)
    stats = normalizer_stats(model, v, xs) if norm != "batch" else None
    rep = upper_bound(model, v, input_shape=(7,), stats=stats)
    local = float(jnp.max(input_lipschitz(model, v, xs, bn_mode=bn).value))
    assert rep.sound and local <= rep.normalized_bound * (1 + 1e-5), (seed, local, rep.table())
    assert local <= rep.certified_bound * (1 + 1e-5) and rep.certified_bound <= rep.paper_bound
    assert rep.scope == ("data" if norm in ("layer", "group", "rms") else "global")
    np.testing.assert_allclose(rep.normalized_bound,
                               rep.product_bound * rep.norm_factor_product(), rtol=1e-9)
    dense = math.prod(_svd(v["params"][f"dense_{i}"]["kernel"]) for i in range(4))
    np.testing.assert_allclose(rep.product_bound, dense, rtol=1e-8)
    if rep.norm_factor_product() <= 1:
      assert rep.product_bound >= rep.normalized_bound


@pytest.mark.slow
def test_bn_eval_factor_is_exact(x64):
  """BN in eval mode: Lip = max_j |gamma_j| / sqrt(var_j + eps) exactly (autodiff of the
  layer alone, and the bound report's entry)."""
  rng = np.random.default_rng(0)
  bn = BatchNorm()
  gamma, var = rng.uniform(-2, 2, 6), rng.uniform(0.01, 3, 6)
  v = {"params": {"scale": jnp.asarray(gamma), "bias": jnp.asarray(rng.normal(size=6))},
       "batch_stats": {"mean": jnp.asarray(rng.normal(size=6)), "var": jnp.asarray(var)}}
  expected = np.max(np.abs(gamma) / np.sqrt(var + 1e-5))
  lip = jacobian_spectral_norm(lambda x: bn.apply(v, x[None], use_batch_stats=False)[0],
                               jnp.asarray(rng.normal(size=6)))
  np.testing.assert_allclose(float(lip.value), expected, rtol=1e-12)
  model = get_model("relu_net", depth=2, width=6, num_classes=3, norm="batch")
  mv = random_variables(model, (4,))
  mv = {**mv, "params": {**mv["params"], "norm_0": v["params"]},
        "batch_stats": {"norm_0": v["batch_stats"]}}
  entry = [e for e in upper_bound(model, mv, input_shape=(4,)).entries if e.path == ("norm_0",)]
  np.testing.assert_allclose(entry[0].upper, expected, rtol=1e-8)
  # the float64 factor of the bound code is the normalizers' lipschitz_factor
  for scale, sigma2 in ((gamma, var), (gamma, 0.3), (None, var)):
    np.testing.assert_allclose(normalizer_factor(scale, sigma2, 1e-5),
                               float(lipschitz_factor(scale, jnp.asarray(sigma2), 1e-5)),
                               rtol=1e-12)


def test_batch_modes_and_missing_stats():
  model = get_model("relu_net", depth=3, width=8, num_classes=3, norm="batch")
  xs = jax.random.normal(jax.random.key(0), (12, 5))
  v = random_variables(model, (5,), 1)
  coupled = upper_bound(model, v, input_shape=(5,), bn_mode="batch_coupled")
  assert not coupled.sound and coupled.normalized_bound == math.inf
  assert any("no sound bound" in r for r in coupled.reasons)
  assert math.isfinite(coupled.product_bound)   # the unnormalized product still exists
  assert upper_bound(model, v, input_shape=(5,), bn_mode="batch_fixed").normalized_bound \
      == math.inf
  stats = normalizer_stats(model, v, xs, bn_mode="batch_fixed")
  fixed = upper_bound(model, v, input_shape=(5,), bn_mode="batch_fixed", stats=stats)
  local = input_lipschitz(model, v, xs, bn_mode="batch_fixed").value
  assert fixed.sound and fixed.scope == "batch"
  assert float(jnp.max(local)) <= fixed.normalized_bound * (1 + 1e-5)
  ln = get_model("relu_net", depth=3, width=8, num_classes=3, norm="layer")
  lv = random_variables(ln, (5,))
  rep = upper_bound(ln, lv, input_shape=(5,))
  assert not rep.sound and any("normalizer_stats" in r for r in rep.reasons)
  # the per-layer numbers are still all there
  assert [e.path for e in rep.entries if e.kind == "dense"] == [("dense_0",), ("dense_1",),
                                                                ("dense_2",)]
  with pytest.raises(ValueError, match="bn_mode='train'"):
    upper_bound(model, v, input_shape=(5,), bn_mode="train")
  with pytest.raises(ValueError, match=r"input_shape=\(6,\)"):
    upper_bound(model, v, input_shape=(6,))


CONV_NETS = [("cnn", dict(widths=(4, 8), convs_per_stage=2), (8, 8, 3)),
             ("cnn", dict(widths=(4, 8), convs_per_stage=1, downsample="strided_conv"),
              (8, 8, 3)),
             ("resnet18", dict(stage_sizes=(1, 1), width=4), (8, 8, 3)),
             ("resnet50", dict(stage_sizes=(1,), width=2, stem="imagenet"), (12, 12, 3))]


@pytest.mark.parametrize("name,kwargs,shape", CONV_NETS)
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
@pytest.mark.slow
def test_bound_is_sound_on_random_conv_nets(name, kwargs, shape, norm):
  """CNN (avg-pool and strided), ResNet (identity and projection shortcuts, CIFAR and
  ImageNet stems with the overlapping max pool): eval mode, 4 seeds."""
  model = get_model(name, norm=norm, num_classes=5, **kwargs)
  bn = "eval" if norm == "batch" else None
  xs = 2.0 * jax.random.normal(jax.random.key(0), (6, *shape))
  for seed in range(4):
    v = random_variables(model, shape, seed)
    stats = normalizer_stats(model, v, xs) if norm == "layer" else None
    rep = upper_bound(model, v, input_shape=shape, stats=stats)
    local = float(jnp.max(input_lipschitz(model, v, xs, bn_mode=bn).value))
    assert rep.sound and local <= rep.normalized_bound * (1 + 1e-5), (seed, rep.table())
    assert local <= rep.certified_bound * (1 + 1e-5) <= rep.paper_bound * (1 + 1e-5)
    assert all(e.upper >= e.estimate * (1 - 1e-6) for e in rep.entries)
    if name == "resnet50":
      assert any(e.kind == "pool:max" and e.upper == 2.0 for e in rep.entries)


class ResMLP(nn.Module):
  """x -> inp -> [shortcut + (b1 -> relu -> b2)] -> (optional gate) -> out."""
  projection: bool = False
  gated: bool = False

  @nn.compact
  def __call__(self, x, train=False, use_batch_stats=None):
    h = nn.Dense(6, name="inp")(x)
    branch = nn.Dense(6, name="b2")(nn.relu(nn.Dense(6, name="b1")(h)))
    h = (nn.Dense(6, use_bias=False, name="proj")(h) if self.projection else h) + branch
    if self.gated:
      h = h * nn.sigmoid(nn.Dense(6, name="gate")(h))
    return nn.Dense(3, name="out")(h)

  def structure(self):
    shortcut = st.Linear(("proj",)) if self.projection else None
    block = st.Residual(st.seq(st.Linear(("b1",)), st.Activation("relu"),
                               st.Linear(("b2",))), shortcut)
    gate = st.Unbounded("x * sigmoid(g(x)) gating", ("gate",), st.Linear(("gate",))) \
        if self.gated else None
    return st.seq(st.Linear(("inp",)), block, gate, st.Linear(("out",)))


@pytest.mark.parametrize("projection", [False, True])
def test_residual_composition(projection):
  model = ResMLP(projection=projection)
  xs = jax.random.normal(jax.random.key(0), (32, 4))
  for seed in range(5):
    v = random_variables(model, (4,), seed)
    p = v["params"]
    shortcut = _svd(p["proj"]["kernel"]) if projection else 1.0
    expected = _svd(p["inp"]["kernel"]) * (
        shortcut + _svd(p["b1"]["kernel"]) * _svd(p["b2"]["kernel"])) * _svd(p["out"]["kernel"])
    rep = upper_bound(model, v, input_shape=(4,))
    np.testing.assert_allclose(rep.normalized_bound, expected, rtol=1e-8)
    assert [e.kind for e in rep.entries].count("residual") == 1
    assert float(jnp.max(input_lipschitz(model, v, xs).value)) <= rep.normalized_bound


def test_unbounded_block_reports_inf_and_inner_layers():
  model = ResMLP(gated=True)
  v = random_variables(model, (4,))
  rep = upper_bound(model, v, input_shape=(4,))
  assert rep.normalized_bound == math.inf and rep.product_bound == math.inf
  assert not rep.sound and rep.scope == "none"
  assert any("gating" in r for r in rep.reasons)
  gate = [e for e in rep.entries if e.path == ("gate",) and e.kind == "dense"]
  np.testing.assert_allclose(gate[0].estimate, _svd(v["params"]["gate"]["kernel"]), rtol=1e-9)


def test_merge_stats_takes_the_minimum():
  model = get_model("relu_net", depth=3, width=8, num_classes=3, norm="layer")
  xs = jax.random.normal(jax.random.key(0), (8, 5))
  v = random_variables(model, (5,))
  a, b = normalizer_stats(model, v, xs[:4]), normalizer_stats(model, v, xs[4:])
  both = normalizer_stats(model, v, xs, batch_size=3)
  merged = merge_stats(a, b)
  for k in both:
    np.testing.assert_allclose(merged[k], both[k], rtol=1e-6)


@pytest.mark.parametrize("name,kwargs,shape", [
    ("relu_net", dict(depth=4, width=8), (5,)),
    ("resnet18", dict(stage_sizes=(1, 1), width=4), (8, 8, 3))])
def test_factors_below_one_never_raise_the_bound(name, kwargs, shape):
  """BN (eval) with running variances 4 and gains <= 1: every factor is <= 1/2, so the
  normalized bound is at most the unnormalized product (equal to product x factors for
  the sequential net); still above every local constant."""
  model = get_model(name, norm="batch", num_classes=4, **kwargs)
  v = random_variables(model, shape, 3)
  v["batch_stats"] = jax.tree.map(lambda a: jnp.full_like(a, 4.0), v["batch_stats"])
  v["params"] = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 0.6 if p[-1].key == "scale" else a, v["params"])
  rep = upper_bound(model, v, input_shape=shape)
  factors = [e.upper for e in rep.entries if e.kind == "norm:batch"]
  assert factors and max(factors) <= 0.5
  assert rep.normalized_bound < rep.product_bound
  if name == "relu_net":
    np.testing.assert_allclose(rep.normalized_bound,
                               rep.product_bound * math.prod(factors), rtol=1e-9)
  xs = jax.random.normal(jax.random.key(0), (6, *shape))
  assert float(jnp.max(input_lipschitz(model, v, xs, bn_mode="eval").value)) <= \
      rep.normalized_bound


def test_a_diverged_net_has_no_bound_and_its_probe_reads_nan():
  """NaN weights after the last normalizer leave its statistics finite: the bound
  raises NonFiniteError naming the leaf (it was a NumPy SVD failure), the probe NaN."""
  from lipnorm import lipschitz
  from lipnorm.probes import lipschitz_metrics
  model = get_model("relu_net", num_classes=3, depth=2, width=4, norm="layer")
  xs = jnp.ones((2, 5)).at[1].set(jnp.arange(5.0))
  v = model.init(jax.random.PRNGKey(0), xs, train=False)
  v = {"params": {**v["params"], "dense_1": {**v["params"]["dense_1"],
                                             "kernel": v["params"]["dense_1"]["kernel"] * jnp.nan}}}
  stats = normalizer_stats(model, v, xs)
  assert all(np.isfinite(np.asarray(s)).all() for s in jax.tree_util.tree_leaves(stats))
  with pytest.raises(lipschitz.NonFiniteError, match=r"\['dense_1'\]\['kernel'\]"):
    upper_bound(model, v, input_shape=(5,), stats=stats)
  out = lipschitz_metrics.bounds(model, v, xs, "eval")
  assert out and all(math.isnan(x) for x in out.values())
