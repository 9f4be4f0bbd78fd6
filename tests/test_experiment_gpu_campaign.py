"""bench/gpu_campaign.py at tiny size on CPU: both models train, Figures 1-3 are written,
step time / FLOPs / MFU are reported, and the budget timer stops a run cleanly."""
import json
import math
import time

import pytest

from bench import gpu_campaign
from lipnorm.experiments import presets
from lipnorm.training import train


def _png_ok(path):
  data = path.read_bytes()
  return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_gpu_campaign_tiny_on_cpu(tmp_path):
  assert gpu_campaign.main(["--tiny", "--out", str(tmp_path), "--resnet_epochs", "2",
                            "--effnet_epochs", "2", "--budget_s", "1200",
                            "--reserve_s", "30", "--peak_tflops", "1.0"]) == 0
  s = json.loads((tmp_path / "campaign.json").read_text())
  assert [r["model"] for r in s["runs"]] == ["resnet18", "efficientnet_b3"]
  assert s["lipschitz"] is False
  for r in s["runs"]:
    assert r["status"] == "completed" and r["steps"] == 2
    assert r["flops_per_step"] > 0 and r["step_time_median_s"] > 0
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_time_median_s"] / 1e12)
    for fig in ("fig1_weights.png", "fig2_variances.png", "fig3_selected_layers.png"):
      assert _png_ok(tmp_path / r["model"] / "dynamics" / fig)
    assert r["dynamics"]["steps"] == [0, 2]
  assert "| resnet18 | completed |" in (tmp_path / "campaign.md").read_text()


def test_campaign_configs_are_the_gpu_presets_in_bf16():
  for _, name in gpu_campaign.MODELS:
    c = gpu_campaign.campaign_config(name, 3.0, tiny=False, data_dir="/data")
    assert c.dtype == "bfloat16" and c.probes.enabled and c.model.norm == "batch"
    assert c.data.source == "cifar10" and c.data.data_dir == "/data" and c.num_epochs == 3.0
    assert c.schedule.warmup_steps <= 3 * 50000 // 128 // 10   # a tenth of the schedule
    assert not c.probes.lipschitz and gpu_campaign.campaign_config(
        name, 3.0, tiny=False, data_dir=None, lipschitz=True).probes.lipschitz
  kind, peak = gpu_campaign.device_peak(None)
  assert isinstance(kind, str) and (math.isnan(peak) or peak > 1e12)
  assert gpu_campaign.device_peak(2.0)[1] == 2e12
  # cost_analysis() comes as a dict, a one-element list, or nothing (e.g. on a GPU)
  assert gpu_campaign._flops([{"flops": 3.0}]) == gpu_campaign._flops({"flops": 3.0}) == 3.0
  assert gpu_campaign._flops(None) is None and gpu_campaign._flops([]) is None


@pytest.mark.slow
def test_stop_after_preempts_training(tmp_path):
  c = presets.tiny_train(100000)
  c.probes.enabled = False
  t0 = time.time()
  with gpu_campaign.stop_after(3.0):
    summary = train(c, str(tmp_path), interactive=False)
  assert summary["status"] == "preempted" and 0 < summary["step"] < 100000
  assert time.time() - t0 < 120


def test_phase_times_refuses_unknown_phases_and_models_first(capsys):
  from bench import gpu_phase_times
  for flags, bad in ((["--phases", "train,nope"], "'nope'"), (["--models", "vgg"], "'vgg'")):
    with pytest.raises(SystemExit) as e:
      gpu_phase_times.main(["--tiny", *flags])
    assert e.value.code == 2
    out = capsys.readouterr()
    assert bad in out.err and "allowed" in out.err and not out.out   # nothing ran


@pytest.mark.slow
def test_phase_times_tiny_on_cpu(capsys):
  """bench/gpu_phase_times.py at tiny size: one JSON line per phase, the training step
  timed and its MFU computed, each probe part called twice (compile, then reuse)."""
  from bench import gpu_phase_times
  assert gpu_phase_times.main(["--tiny", "--steps", "2", "--models", "resnet18",
                               "--peak_tflops", "1.0"]) == 0
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert lines[0]["device"] and lines[0]["peak_flops"] == 1e12
  phases = {l["phase"]: l for l in lines[1:]}
  assert list(phases) == ["train", "layers", "lip_x", "lip_theta", "bound", "hessian"]
  train = phases["train"]
  assert train["steps"] == 2 and train["step_time_median_s"] > 0
  assert train["mfu"] == pytest.approx(train["flops_per_step"] / train["step_time_median_s"]
                                       / 1e12)
  for name in ("layers", "lip_x", "lip_theta", "bound", "hessian"):
    assert phases[name]["first_call_s"] > 0 and phases[name]["second_call_s"] > 0
  assert phases["lip_theta"]["values"]["eval/lip_theta_max"] > 0
  assert phases["bound"]["values"]["eval/bound"] >= phases["bound"]["values"][
      "eval/lip_x_max"] * (1 - 1e-5)
