"""Probe hooks in the training loop: what they log, and that logging changes nothing."""
import json

import jax
import numpy as np
import pytest

from lipnorm.models import get_model
from lipnorm.probes import LayerProber, flatten_probes
from lipnorm.probes.hooks import (LayerProbeHook, LipschitzHook, measurement_model,
                                  probe_hook_fns)
from lipnorm.training import load_checkpoint, train
from training_helpers import tiny_config



def _probed_config(**changes):
  """The tiny BN training config (tests/training_helpers.py) with every probe on:
  layers (spectral norms every 2 steps), Lipschitz in eval and batch_fixed modes, bound,
  Hessian."""
  return tiny_config(**{
      "probes.enabled": True, "probes.batch_size": 32, "probes.spectral_every_steps": 2,
      "probes.lipschitz_examples": 4, "probes.lipschitz_bn_modes": ("eval", "batch_fixed"),
      "probes.hessian_examples": 16, **changes})


@pytest.mark.slow
def test_training_with_probes_ends_with_the_same_parameters(tmp_path):
  """Probes every step (layers; spectral norms every 3 steps and at the end) and every 2
  steps (Lipschitz, bound, Hessian) must not change a single bit of the trained
  parameters or BN statistics."""
  finals = {}
  for enabled in (False, True):
    c = _probed_config(**{"num_train_steps": 4, "eval_every_steps": 4,
                          "checkpoint_every_steps": 4, "probes.enabled": enabled,
                          "probes.every_steps": 1, "probes.lipschitz_every_steps": 2,
                          "probes.spectral_every_steps": 3})
    workdir = tmp_path / f"probes_{enabled}"
    summary = train(c, str(workdir), interactive=False)
    assert summary["status"] == "completed"
    finals[enabled] = load_checkpoint(str(workdir))["state"]
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["kind"] == "probe"]
    if enabled:
      layer_steps = sorted(r["step"] for r in probes if r["hook"] == "layers")
      lip_steps = sorted(r["step"] for r in probes if r["hook"] == "lipschitz")
      assert layer_steps == [0, 1, 2, 3, 4] and lip_steps == [0, 2, 4]
      # exact weight norms every 3 steps and at the last one, where the series ends
      assert sorted(r["step"] for r in probes if "weight_spectral" in r) == [0, 3, 4]
      lip = [r for r in probes if r["hook"] == "lipschitz"][-1]
      assert lip["eval/lip_x_max"] > 0 and lip["batch_fixed/lip_theta_max"] > 0
      assert lip["eval/bound"] >= lip["eval/lip_x_max"] * (1 - 1e-4)
      assert np.isfinite(lip["hessian_top"])
      layers = [r for r in probes if r["hook"] == "layers"][-1]
      assert len(layers["weight_spectral"]) == 3 and len(layers["batch/norm_var_mean"]) == 2
      # The summary carries each hook's latest scalars (lists stay in the JSONL only).
      assert summary["probes"]["lipschitz"] == {
          k: v for k, v in lip.items() if k not in ("kind", "time", "hook")}
      assert "weight_spectral" not in summary["probes"]["layers"]
    else:
      assert not probes and summary["probes"] == {}
  chex_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                            finals[False]["params"], finals[True]["params"])
  assert all(jax.tree.leaves(chex_equal))
  bs_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                          finals[False]["batch_stats"], finals[True]["batch_stats"])
  assert all(jax.tree.leaves(bs_equal))


@pytest.mark.slow
def test_hooks_measure_without_the_pmap_axis_in_float32():
  """The training model (BN over the pmap axis, bfloat16 compute) is measured as the
  float32 single-device net of the same variables: the hooks' numbers are those of the
  plain float32 model (to float32 rounding), and the Lipschitz hook runs (eigh has no
  bfloat16 kernel: a bf16 campaign on a GPU failed at its first probe before)."""
  model = get_model("relu_net", depth=3, width=8, norm="batch", bn_axis_name="batch",
                    dtype=jax.numpy.bfloat16)
  x = jax.random.normal(jax.random.key(0), (16, 5))
  batch = {"image": x, "label": jax.numpy.arange(16) % 10}
  variables = jax.jit(model.init)(jax.random.key(1), x[:1])   # one compile, not one per op
  variables = {k: variables[k] for k in ("params", "batch_stats")}
  c = _probed_config(**{"probes.every_steps": 5, "probes.lipschitz_every_steps": 7,
                        "probes.spectral_every_steps": 10})
  c.probes.lipschitz_examples, c.probes.hessian_examples = 3, 0   # Hessian: test above
  fns = dict((name, (every, fn)) for name, every, fn in
             probe_hook_fns(c, model, 10, last_step=13))
  assert fns["layers"][0] == 5 and fns["lipschitz"][0] == 7
  logged = fns["layers"][1](0, variables, batch)     # batch mode works: axis stripped
  plain = get_model("relu_net", depth=3, width=8, norm="batch")
  direct = flatten_probes(LayerProber(plain, bn_modes=("eval", "batch"))(variables, x))
  assert logged.keys() == direct.keys()
  for k in direct:
    np.testing.assert_allclose(logged[k], direct[k], rtol=1e-6)
  # Spectral norms at steps divisible by spectral_every and at the last step only.
  spectral_keys = {k for k in direct if k.startswith("weight_spectral")}
  assert spectral_keys
  assert spectral_keys <= set(fns["layers"][1](13, variables, batch))
  assert not spectral_keys & set(fns["layers"][1](5, variables, batch))
  lip = fns["lipschitz"][1](0, variables, batch)
  assert {"eval/lip_x_max", "batch_fixed/lip_x_mean", "eval/bound"} <= set(lip)
  assert "hessian_top" not in lip
  plain_lip = LipschitzHook(plain, 7, num_classes=10, num_examples=3, hessian_examples=0,
                            bn_modes=c.probes.lipschitz_bn_modes)(0, variables, batch)
  assert lip.keys() == plain_lip.keys()
  for k in lip:
    np.testing.assert_allclose(lip[k], plain_lip[k], rtol=1e-6, err_msg=k)
  assert measurement_model(plain) is plain
  c.probes.enabled = False
  assert probe_hook_fns(c, model, 10) == []
  with pytest.raises(ValueError, match="every"):
    LayerProbeHook(plain, 0)
  with pytest.raises(ValueError, match="num_examples"):
    LipschitzHook(plain, 1, num_classes=10, num_examples=0)


@pytest.mark.slow
def test_hooks_compile_once_and_reuse_it_at_later_probes():
  """The first probe compiles; later probes of new weights (same shapes) trace and
  compile nothing: every jitted core is cached across calls, keyed on the (hashable)
  model, and nothing is rebuilt per call."""
  from jax._src import dispatch, monitoring
  model = get_model("relu_net", depth=3, width=8, norm="layer")
  x = jax.random.normal(jax.random.key(0), (16, 5))
  batch = {"image": x, "label": jax.numpy.arange(16) % 10}
  v1 = model.init(jax.random.key(1), x[:1])
  c = _probed_config()
  c.probes.lipschitz_examples, c.probes.hessian_examples = 3, 8
  hooks = [fn for _, _, fn in probe_hook_fns(c, model, 10)]
  for fn in hooks:
    fn(0, v1, batch)
  later = {s: jax.tree.map(lambda a, s=s: a * (1 + 0.1 * s), v1) for s in (2, 4)}
  compiles = []

  def listen(event, duration, **kwargs):
    if event == dispatch.BACKEND_COMPILE_EVENT:
      compiles.append(kwargs.get("fun_name", event))
  monitoring.register_event_duration_secs_listener(listen)
  try:
    for step, v in later.items():
      results = [fn(step, v, batch) for fn in hooks]
  finally:
    monitoring.unregister_event_duration_listener(listen)
  assert compiles == []
  assert results[1]["eval/lip_x_max"] > 0 and np.isfinite(results[1]["hessian_top"])


def test_chain_max_dim_option_selects_the_certified_bound():
  """`probes.chain_max_dim` defaults to the engine's; 0 skips the chain bound, so the
  certified bound is the folded product (never below the chain's)."""
  from lipnorm.lipschitz.certified import DEFAULT_CHAIN_MAX_DIM
  from lipnorm.probes.options import PROBE_OPTIONS, validate_probe_options
  assert PROBE_OPTIONS["chain_max_dim"] == DEFAULT_CHAIN_MAX_DIM
  with pytest.raises(ValueError, match="chain_max_dim"):
    validate_probe_options({"chain_max_dim": -1})
  model = get_model("relu_net", depth=3, width=8, norm="none")
  x = jax.random.normal(jax.random.key(0), (6, 5))
  variables = model.init(jax.random.key(1), x[:1])
  out = {}
  for cap in (DEFAULT_CHAIN_MAX_DIM, 0):
    hook = LipschitzHook(model, 1, num_classes=10, num_examples=4, param=False,
                         hessian_examples=0, chain_max_dim=cap)
    out[cap] = hook(0, variables, {"image": x, "label": jax.numpy.zeros(6, int)})
  assert out[0]["eval/lip_bound_certified"] <= out[0]["eval/lip_bound_paper"]
  assert out[DEFAULT_CHAIN_MAX_DIM]["eval/lip_bound_certified"] < \
      out[0]["eval/lip_bound_certified"]
  assert out[DEFAULT_CHAIN_MAX_DIM]["eval/lip_bound_certified"] >= \
      out[0]["eval/lip_x_max"] * (1 - 1e-5)
