"""The paper's bound and lipnorm's certified bounds (global and local) are sound: never
below a float64 SVD of the explicitly formed Jacobian, nor below the local constants and
the lower-bound search on random nets of every normalizer; and they are ordered
(local constant <= local bound <= global certified bound <= paper's bound)."""
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipnorm.lipschitz import input_lipschitz, normalizer_stats, tightness, upper_bound
from lipnorm.lipschitz.certified import (ChainBound, chain_dp, eclipse_fast,
                                         local_upper_bound)
from lipnorm.models import get_model
from lipnorm.probes import lipschitz_metrics
from lipschitz_testing import explicit_norms, f64_model, x64  # noqa: F401


NORMS = [("none", None), ("batch", None), ("layer", None), ("group", {"num_groups": 2}),
         ("rms", None)]
RTOL = 1e-7


def _flip_gain_signs(v, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, a: a * jnp.asarray(rng.choice([-1.0, 1.0], a.shape), a.dtype)
      if p[-1].key == "scale" else a, v)


def _explicit(model, v, xs):
  return explicit_norms(lambda x, i: model.apply(v, x[None])[0], xs)


@pytest.mark.parametrize("norm,opts", NORMS)
@pytest.mark.slow
def test_bounds_sound_against_float64_explicit_jacobians(x64, norm, opts):
  """float64 relu_nets (random gain signs, kernels scaled 0.3-3x): every bound >= the
  float64 SVD of the explicit Jacobian at the data (and, for global-scope nets, at 200
  more points); certified <= paper; the chain bound is used for these chains."""
  for seed in range(3):
    model, v = f64_model(get_model, "relu_net", seed, input_shape=(6,), depth=2 + 2 * seed,
                         width=8, num_classes=3, norm=norm, norm_options=opts)
    rng = np.random.default_rng(seed)
    v = _flip_gain_signs(v, seed)
    v["params"] = {k: ({**p, "kernel": p["kernel"] * np.exp(rng.uniform(np.log(.3), np.log(3)))}
                       if "kernel" in p else p) for k, p in v["params"].items()}
    xs = jnp.asarray(rng.normal(0, 2, (24, 6)))
    stats = normalizer_stats(model, v, xs) if norm not in ("none", "batch") else None
    rep = upper_bound(model, v, input_shape=(6,), stats=stats)
    pts = xs if rep.scope == "data" else jnp.concatenate([xs, jnp.asarray(
        rng.normal(0, 3, (200, 6)))])
    exact = float(np.max(_explicit(model, v, pts)))
    for name in ("paper_bound", "folded_bound", "chain_bound", "certified_bound"):
      assert getattr(rep, name) >= exact * (1 - RTOL), (norm, seed, name, rep.table())
    assert rep.certified_bound <= rep.paper_bound
    assert rep.certified_bound == min(rep.folded_bound, rep.chain_bound)
    assert math.isfinite(rep.chain_bound)


@pytest.mark.slow
def test_chain_program_against_enumeration_and_exact_cases():
  """One relu junction: max over all 2^n patterns of ||A D B|| (the exact Lipschitz
  constant of x -> A relu(Bx) over patterns) <= chain_dp and ECLipsE-Fast <= ||A|| ||B||;
  identity junctions: chain_dp = ||A B|| exactly; three maps: above enumeration."""
  rng = np.random.default_rng(0)
  for trial in range(20):
    n = 6
    a, b, c = (rng.normal(size=(5, n)), rng.normal(size=(n, 4)), rng.normal(size=(3, 5)))
    relu = (np.full(n, 0.5), np.full(n, 0.5))
    best = max(np.linalg.norm(a @ np.diag(d) @ b, 2)
               for d in itertools.product([0.0, 1.0], repeat=n))
    dp = chain_dp([b, a], [relu])
    assert best <= dp * (1 + 1e-12) and best <= eclipse_fast([b, a]) * (1 + 1e-12)
    assert dp <= np.linalg.norm(a, 2) * np.linalg.norm(b, 2) * (1 + 1e-8)
    np.testing.assert_allclose(chain_dp([b, a], [(np.ones(n), np.zeros(n))]),
                               np.linalg.norm(a @ b, 2), rtol=1e-8)
    relu5 = (np.full(5, 0.5), np.full(5, 0.5))
    best3 = max(np.linalg.norm(c @ np.diag(d2) @ a @ np.diag(d1) @ b, 2)
                for d1 in itertools.product([0.0, 1.0], repeat=n)
                for d2 in itertools.product([0.0, 1.0], repeat=5))
    assert best3 <= chain_dp([b, a, c], [relu, relu5]) * (1 + 1e-12), trial
    assert best3 <= eclipse_fast([b, a, c]) * (1 + 1e-12), trial


@pytest.mark.slow
def test_sweep_has_no_violations_fast():
  """The harness on one random relu_net per normalizer (depth 2-4, width 8-16, BN eval
  with random running statistics, gains with random signs): 0 violations, certified <=
  paper, and the certified bound beats the paper's wherever a normalizer is folded."""
  results = tightness.sweep(1, archs=("relu_net",), seed=3, search_steps=0, max_depth=4,
                            max_width=16, num_examples=8)
  for r in results:
    assert not r.violations, (r.desc, r.norm, r.violations)
    assert r.bounds["certified"] <= r.bounds["paper"]
    if r.norm != "none":
      assert r.bounds["certified"] < r.bounds["paper"], (r.desc, r.norm, r.bounds)
  rows = tightness.summary_rows(results)
  assert {row["norm"] for row in rows} == set(tightness.RELU_NET_NORMS)
  assert "| relu_net | batch | global |" in tightness.markdown_table(rows)


@pytest.mark.slow
def test_sweep_has_no_violations_with_search_and_cnns():
  results = tightness.sweep(1, archs=("relu_net", "cnn"), seed=5, search_steps=10,
                            max_depth=6, max_width=32, num_examples=8)
  assert len(results) == len(tightness.RELU_NET_NORMS) + len(tightness.CNN_NORMS)
  for r in results:
    assert not r.violations, (r.desc, r.norm, r.violations)
    assert r.bounds["certified"] <= r.bounds["paper"]


@pytest.mark.parametrize("norm,opts", NORMS)
def test_local_bounds_sit_between_local_constant_and_global(x64, norm, opts):
  """On l2 balls of radius r: the float64 Jacobian norm at the center and at random
  points of the ball <= local bound; radius 0 gives the local constant itself; for
  global-scope nets the raw local bound is <= the global certified bound."""
  model, v = f64_model(get_model, "relu_net", 1, input_shape=(5,), depth=3, width=8,
                       num_classes=3, norm=norm, norm_options=opts)
  v = _flip_gain_signs(v, 1)
  rng = np.random.default_rng(1)
  n, per, radii = 4, 30, (0.02, 0.3)
  xs = jnp.asarray(rng.normal(0, 2, (n, 5)))
  stats = normalizer_stats(model, v, xs) if norm not in ("none", "batch") else None
  zero = local_upper_bound(model, v, xs, 0.0, stats=stats)
  reps = [local_upper_bound(model, v, xs, r, stats=stats) for r in radii]
  d = rng.normal(size=(len(radii), n, per, 5))
  d *= (np.asarray(radii)[:, None, None, None] * rng.uniform(0, 1, (len(radii), n, per, 1))
        ** 0.2) / np.linalg.norm(d, axis=-1, keepdims=True)
  pts = np.asarray(xs)[None, :, None, :] + d
  norms = _explicit(model, v, jnp.concatenate([xs, jnp.asarray(pts.reshape(-1, 5))]))
  center, inside = norms[:n], norms[n:].reshape(len(radii), n, per)
  assert np.all(zero.raw >= center * (1 - RTOL))
  np.testing.assert_allclose(zero.raw, center, rtol=1e-5, atol=1e-5 * center.max())
  for radius, rep, ball in zip(radii, reps, inside):
    assert rep.radius == radius and f"radius {radius:g}" in rep.scope
    assert np.all(rep.values >= center * (1 - RTOL)), (radius, rep.values, center)
    assert np.all(ball.max(axis=1) <= rep.values * (1 + RTOL)), (radius, ball, rep.values)
    if rep.global_scope == "global":
      assert np.all(rep.raw <= rep.global_certified * (1 + 1e-9)), (radius, rep.raw)


@pytest.mark.slow
def test_local_bounds_on_a_cnn_and_bad_input():
  model = get_model("cnn", widths=(4, 8), convs_per_stage=1, num_classes=3, norm="batch")
  from lipschitz_testing import random_variables  # noqa: PLC0415
  v = random_variables(model, (8, 8, 3), 2)
  xs = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  local = np.asarray(input_lipschitz(model, v, xs, bn_mode="eval").value)
  rep = local_upper_bound(model, v, xs, 0.05)
  assert np.all(rep.values >= local * (1 - 1e-5))
  assert np.all(rep.raw <= rep.global_certified * (1 + 1e-9))
  with pytest.raises(ValueError, match="radius=-1"):
    local_upper_bound(model, v, xs, -1.0)
  res = get_model("resnet18", stage_sizes=(1,), width=4, num_classes=3)
  rv = random_variables(res, (8, 8, 3))
  with pytest.raises(ValueError, match="sequential chain"):
    local_upper_bound(res, rv, xs, 0.1)


def test_report_is_frozen_flags_degenerate_normalizers_and_probes_log_both():
  model = get_model("relu_net", depth=3, width=8, num_classes=3, norm="batch")
  from lipschitz_testing import random_variables  # noqa: PLC0415
  v = random_variables(model, (5,), 0)
  rep = upper_bound(model, v, input_shape=(5,))
  with pytest.raises(dataclasses.FrozenInstanceError):
    rep.paper_bound = 0.0
  assert rep.normalized_bound == rep.paper_bound and rep.flags == ()
  v["batch_stats"]["norm_1"]["var"] = v["batch_stats"]["norm_1"]["var"].at[3].set(1e-7)
  rep = upper_bound(model, v, input_shape=(5,))
  assert [f.path for f in rep.flags] == [("norm_1",)] and "near-degenerate" in rep.table()
  # LN whose input barely varies (tiny inputs, no bias before it): flagged in the data scope
  ln = get_model("relu_net", depth=3, width=8, num_classes=3, norm="layer")
  lv = random_variables(ln, (5,), 0)
  tiny = 1e-4 * jax.random.normal(jax.random.key(0), (8, 5))
  rep = upper_bound(ln, lv, input_shape=(5,), stats=normalizer_stats(ln, lv, tiny))
  assert ("norm_0",) in [f.path for f in rep.flags] and rep.scope == "data"
  xs = jax.random.normal(jax.random.key(1), (8, 5))
  out = lipschitz_metrics.bounds(model, random_variables(model, (5,), 0), xs, "eval")
  assert set(out) == set(lipschitz_metrics.BOUND_KEYS)
  assert out["bound"] == out["lip_bound_paper"] >= out["lip_bound_certified"] > 0
  assert out["lip_bound_certified"] >= float(
      jnp.max(input_lipschitz(model, random_variables(model, (5,), 0), xs,
                              bn_mode="eval").value)) * (1 - 1e-5)


def test_chainbound_is_immutable_and_identity_chain_is_exact():
  a, b = np.arange(6.0).reshape(2, 3), np.ones((3, 2))
  chain = ChainBound((b, a), (np.zeros(3), np.zeros(2)), (), 2)
  with pytest.raises(dataclasses.FrozenInstanceError):
    chain.input_size = 3
  # no junction: the chain is one affine map (its norm, exactly)
  np.testing.assert_allclose(chain_dp([a @ b], []), np.linalg.norm(a @ b, 2), rtol=1e-8)
