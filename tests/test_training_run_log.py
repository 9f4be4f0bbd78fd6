"""The run-log contract (`lipnorm.training.run_log`): one tolerance rule, typed records,
summary files; and the progress ETA, averaged over the whole session."""
import json

import pytest
from absl import logging as absl_logging

from lipnorm.training import run_log
from lipnorm.training.metrics_writer import MetricsWriter, Progress


def _write(path, lines):
  path.write_text("".join(lines))


def test_round_trip_and_typed_records(tmp_path):
  w = MetricsWriter(str(tmp_path), enabled=True)
  w.write(1, "train", {"loss": 0.5, "accuracy": 0.25, "per_layer": [1.0, float("nan")]})
  w.event(1, "checkpoint")
  w.close()
  records = run_log.read_records(tmp_path)
  assert [(r.step, r.kind) for r in records] == [(1, "train"), (1, "event")]
  assert records[0].values["per_layer"] == [1.0, None]        # non-finite -> null
  assert records[0].get(run_log.ACCURACY) == 0.25
  assert run_log.read_metrics(tmp_path / "metrics.jsonl")[1]["event"] == "checkpoint"
  with pytest.raises(ValueError, match="kind 'trian' is not allowed"):
    run_log.make_record(1, "trian", {})


def test_torn_last_line_is_skipped_with_a_warning(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: warnings.append(msg % a))
  path = tmp_path / "metrics.jsonl"
  _write(path, ['{"step": 1, "kind": "train", "time": 0, "loss": 1}\n', '{"step": 2, "ki'])
  assert [r.step for r in run_log.read_records(tmp_path)] == [1]
  assert len(warnings) == 1 and "line 2" in warnings[0] and "torn" in warnings[0]


@pytest.mark.parametrize("lines,match", [
    (['{"step": 1, "ki\n', '{"step": 2, "kind": "eval", "time": 0}\n'], r"line 1 is not JSON"),
    (['{"step": 1, "kind": "train", "time": 0}\n', '[1, 2]\n'], r"line 2: not a JSON object"),
    (['{"step": "1", "kind": "train", "time": 0}\n'], r"line 1: needs an int 'step'"),
    (['{"step": 1, "kind": "other", "time": 0}\n'], r"kind='other'"),
    # a complete last line (newline-terminated) that is not JSON is damage, not a tear
    (['{"step": 1, "kind": "train", "time": 0}\n', 'garbage\n'], r"line 2 is not JSON"),
])
def test_any_other_bad_line_raises_naming_it(tmp_path, lines, match):
  _write(tmp_path / "metrics.jsonl", lines)
  with pytest.raises(run_log.RunLogError, match=match):
    run_log.read_records(tmp_path)


def test_experiments_read_through_the_contract(tmp_path):
  from lipnorm.experiments.records import read_records
  _write(tmp_path / "metrics.jsonl", ['{"step": 1, "kind": "train", "time": 0}\n', 'x\n'])
  with pytest.raises(ValueError, match="line 2 is not JSON"):
    read_records(tmp_path)


def test_summary_files(tmp_path):
  assert run_log.read_summary(tmp_path) is None
  with pytest.raises(ValueError, match="lacks field"):
    run_log.write_summary(tmp_path, {"status": "completed"})
  summary = {k: None for k in run_log.SUMMARY_FIELDS}
  summary.update(status="completed", probe_time_share=float("nan"))
  run_log.write_summary(tmp_path, summary)
  assert run_log.read_summary(tmp_path) == {**summary, "probe_time_share": None}
  (tmp_path / "summary.json").write_text("[1]")
  with pytest.raises(run_log.RunLogError, match="not a JSON object"):
    run_log.read_summary(tmp_path)
  (tmp_path / "summary.json").write_text(json.dumps(summary)[:-3])
  with pytest.raises(run_log.RunLogError, match="not JSON"):
    run_log.read_summary(tmp_path)


def test_eta_is_averaged_over_the_session():
  now = [0.0]
  p = Progress(total=100, initial=0, enabled=False, interactive=False, clock=lambda: now[0])
  p.update()                       # step 1: compiles; the average starts after it
  now[0] = 30.0
  assert p.rate() is None
  for _ in range(9):               # steps 2..10 at 1 s each
    now[0] += 1.0
    p.update()
  assert p.rate() == pytest.approx(9 / 39.0)   # 9 steps in the 39 s since step 1
  now[0] += 60.0                   # a long evaluation pause, then a fast window
  for _ in range(10):
    now[0] += 0.1
    p.update()
  # Whole-session average (19 steps in 100 s), not the last window's 10 steps/s.
  assert p.rate() == pytest.approx(19 / 100.0)
  assert p.eta_s() == pytest.approx(80 / (19 / 100.0))
