"""`train(config, workdir)`: the whole training run, resumable and safe to interrupt.

Order of work at a step boundary that is due for any of it: summarize the logging
window (divergence check), run due hooks, evaluate, checkpoint. A checkpoint is only
written after its window was found finite, so the last checkpoint of a diverged run is
its last finite state. Ends with one of three statuses (also `summary["status"]`):

  completed  all steps done (exit code 0 from train.py)
  diverged   a non-finite loss or gradient norm (exit code 3); `diverged_step` is the
             first update whose loss or gradient norm was non-finite
  preempted  SIGTERM/SIGINT: checkpoint saved at the next step boundary (single
             process) or at the next logging boundary (multi-process, where every
             process must agree to stop); rerun the same command to resume (exit code 4)
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from lipnorm.training import distributed
from lipnorm.training.checkpointing import CheckpointError, Checkpointer
from lipnorm.training.config_schema import (ConfigError, check_batch_sizes, model_error,
                                            validate_config)
from lipnorm.training.hooks import Hook, build_hooks
from lipnorm.training.metrics_writer import MetricsWriter, Progress
from lipnorm.training.optim import make_optimizer, make_schedule
from lipnorm.training.run_log import (ACCURACY, latest_by_kind, latest_probes, probe_scalars,
                                      read_records, read_summary, to_json_value,
                                      write_json_atomic, write_summary)
from lipnorm.training.state import build_model, count_params, create_train_state
from lipnorm.training.steps import eval_metrics, make_steps
from lipnorm.training.workdir import (CONFIG_FILE, check_config, config_as_dict,
                                      prepare_workdir)

EXIT_CODES = {"completed": 0, "diverged": 3, "preempted": 4}
PREFETCH = 2  # batches copied to the devices ahead of the step that uses them


def num_train_steps(config, num_train_examples: int) -> int:
  """`config.num_train_steps`, or `ceil(num_epochs * num_train / batch_size)` when -1."""
  if config.num_train_steps != -1:
    return int(config.num_train_steps)
  return max(1, math.ceil(config.num_epochs * num_train_examples / config.data.batch_size))


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop reads at step boundaries (main thread only;
  a second SIGINT interrupts immediately)."""

  def __init__(self):
    self.signal_name: Optional[str] = None

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = name
    logging.warning("received %s: will checkpoint and stop at the next step boundary", name)

  @contextlib.contextmanager
  def installed(self):
    import threading
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)


def _default_dataset_fn(data_config, **kwargs):
  from lipnorm.data import get_dataset
  return get_dataset(data_config, **kwargs)


def _batches(iterator, devices):
  """Yields (device batch, iterator state after it), keeping PREFETCH batches in flight."""
  queue = collections.deque()

  def pull():
    batch = next(iterator)
    queue.append((distributed.shard_batch(batch, devices), iterator.get_state()))

  for _ in range(PREFETCH):
    pull()
  while True:
    item = queue.popleft()
    pull()
    yield item


def evaluate(p_eval, state, ds, devices, split: str = "test") -> dict:
  """Eval-mode loss and accuracy over a whole split (padding masked out): `eval_metrics`
  of the pmapped `eval_step` sums."""
  sums = (p_eval(state, distributed.shard_batch(b, devices))
          for b in ds.eval_batches(split=split))
  try:
    return {"split": split, **eval_metrics(sums, distributed.first_replica)}
  except ValueError:
    raise ValueError(f"evaluation split {split!r} yielded no batches") from None


def _first_nonfinite(host_metrics: list[dict]) -> tuple[Optional[int], list[str]]:
  """Index of the first step whose loss or grad_norm is non-finite, and those keys."""
  for i, m in enumerate(host_metrics):
    bad = [k for k in ("loss", "grad_norm") if not np.isfinite(m[k])]
    if bad:
      return i, bad
  return None, []


@dataclasses.dataclass(frozen=True)
class _Run:
  """What a training session is made of; built once, before the first step."""
  config: ml_collections.ConfigDict
  workdir: str
  ds: Any
  devices: list
  is_main: bool
  total_steps: int
  schedule: Callable[[int], Any]
  p_train: Callable
  p_eval: Callable
  hooks: tuple[Hook, ...]
  probe_batch: Any
  checkpointer: Checkpointer
  writer: MetricsWriter
  start_step: Optional[int]
  num_params: int


@dataclasses.dataclass(frozen=True)
class _Due:
  """What a step boundary has to do."""
  log: bool
  eval: bool
  checkpoint: bool
  hooks: bool
  stopping: bool

  @property
  def anything(self) -> bool:
    return self.log or self.eval or self.checkpoint or self.hooks


@dataclasses.dataclass
class RunState:
  """The mutable state of a session: the replicated TrainState, the position, the
  current logging window, timings and the latest results for the summary."""
  state: Any                       # replicated TrainState
  step: int                        # updates done
  iterator_state: Any              # data position after the batch of `step`
  session_step0: int               # `step` when this session started
  status: str = "completed"
  diverged_step: Optional[int] = None
  details: dict = dataclasses.field(default_factory=dict)   # of the final event
  pending: list = dataclasses.field(default_factory=list)   # device metrics not yet fetched
  window: list = dataclasses.field(default_factory=list)    # host metrics of the window
  window_t0: float = 0.0           # rate of a window: its steps after the compiling one
  window_steps: int = 0
  session_t0: float = 0.0          # set after the session's first (compiling) step
  latest: dict = dataclasses.field(default_factory=dict)    # last train / eval record
  probes: dict = dataclasses.field(default_factory=dict)    # each hook's latest scalars
  hook_time_s: dict = dataclasses.field(default_factory=dict)  # wall time in each hook


def train(config: ml_collections.ConfigDict, workdir: str, *, override_config: bool = False,
          dataset_fn: Optional[Callable] = None, extra_hooks: Sequence[Hook] = (),
          interactive: Optional[bool] = None) -> dict:
  """Trains (or resumes) the run in `workdir` and returns its summary.

  Args:
    config: a ConfigDict shaped like `config_schema.base_config()` (see configs/).
    workdir: where the run lives; created if absent; resumed if it holds a checkpoint.
    override_config: allow a workdir whose stored config differs from `config`.
    dataset_fn: `fn(config.data, seed=, num_local_devices=, process_index=,
      process_count=) -> dataset` (default `lipnorm.data.get_dataset`).
    extra_hooks: hooks run besides `build_hooks(config, model, ds)`.
    interactive: progress bar (True) or log lines (False); default: stderr is a TTY.

  Returns the summary dict also written to `<workdir>/summary.json` (keys:
  `run_log.SUMMARY_FIELDS`): status, step, num_train_steps, diverged_step, final
  (train_loss, train_accuracy, eval_loss, eval_accuracy: the last logged values),
  wall_time_s (this call, start-up included), steps_per_sec and examples_per_sec (this
  call's updates after its first, compiling, one, evaluation and checkpointing
  included), resumed_from_step, num_params, process_count, device_count,
  last_checkpoint_step, probes (each hook's latest scalar results and their step, e.g.
  summary["probes"]["lipschitz"]["eval/lip_x_max"]), hook_time_s (this call's wall time
  in each hook) and probe_time_share (their sum / wall_time_s).
  Rerunning a completed run with the same config changes nothing and returns its stored
  summary. Raises ConfigError (a ValueError, one line) for bad config values, a bad
  workdir or a model the config cannot build, before any training.
  """
  t_start = time.time()
  config = ml_collections.ConfigDict(config.to_dict()) if not isinstance(
      config, ml_collections.ConfigDict) else config.copy_and_resolve_references()
  config = validate_config(config)
  distributed.maybe_initialize(config.distributed)
  check_batch_sizes(config, jax.device_count(), jax.process_count())
  # From here on a SIGTERM/SIGINT (e.g. while building or compiling) is a request to
  # checkpoint and stop at the first step boundary, never a lost run.
  stop = _StopRequest()
  with stop.installed():
    built = _build(config, dataset_fn)
    # Only now, with everything built, is the workdir created.
    workdir = prepare_workdir(workdir)
    config_diffs = check_config(workdir, config, override_config)
    if jax.process_count() > 1:  # everyone has read the old config before it is replaced
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("lipnorm_config_checked")
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    start_step, train_iterator = None, None
    try:
      start_step, host_state, train_iterator = _restore(checkpointer, built.host_state,
                                                        built.ds)
      done = _completed_summary(workdir, start_step, built.total_steps, config_diffs)
      if done is not None:
        return done
      return _run(built, workdir, checkpointer, host_state, train_iterator, start_step,
                  config_diffs=config_diffs, extra_hooks=extra_hooks,
                  interactive=interactive, t_start=t_start, stop=stop)
    finally:
      if hasattr(train_iterator, "close"):  # stops lipnorm.data's prefetch thread
        train_iterator.close()
      checkpointer.close()


@dataclasses.dataclass(frozen=True)
class _Built:
  """What a config builds before the workdir is touched."""
  config: ml_collections.ConfigDict
  ds: Any
  model: Any
  tx: Any
  total_steps: int
  schedule: Callable[[int], Any]
  host_state: Any                  # freshly initialized TrainState (numpy)


def _build(config, dataset_fn) -> _Built:
  """Dataset, step count and schedule (computed once, here), model, optimizer and initial
  state; ConfigError for data or a model the config cannot build."""
  try:
    ds = (dataset_fn or _default_dataset_fn)(
        config.data, seed=config.seed, num_local_devices=jax.local_device_count(),
        process_index=jax.process_index(), process_count=jax.process_count())
  except ValueError as e:  # bad data settings or missing files: a config problem
    raise ConfigError(f"config.data (source {config.data.source!r}): {e}") from None
  total_steps = num_train_steps(config, ds.info.num_train)
  schedule = make_schedule(config, total_steps)
  try:   # a model the config check could not foresee (e.g. a shape only the data fixes)
    model = build_model(config, ds.info.num_classes)
    tx = make_optimizer(config, total_steps, schedule)
    host_state = jax.device_get(create_train_state(model, tx, ds.info.image_shape,
                                                   config.seed))
  except (ValueError, TypeError, ArithmeticError) as e:
    raise model_error(config, e) from None
  return _Built(config, ds, model, tx, total_steps, schedule, host_state)


def _restore(checkpointer, host_state, ds):
  """(latest checkpoint step or None, restored host state, train iterator at its
  position); ConfigError when the checkpoint does not fit this config."""
  start_step = checkpointer.latest_step()
  iterator_state = None
  try:
    if start_step is not None:
      host_state, iterator_state = checkpointer.restore(start_step, host_state)
    return start_step, host_state, ds.train_iterator(iterator_state)  # checks the position
  except CheckpointError:   # damaged files, not a config mismatch: its own message
    raise
  except (ValueError, KeyError, TypeError) as e:
    if start_step is None:
      raise
    raise ConfigError(
        f"cannot resume {checkpointer.directory}/{start_step} with this config "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); a config "
        f"that changes the model, optimizer or data needs a new workdir") from None


def _completed_summary(workdir, start_step, total_steps, config_diffs) -> Optional[dict]:
  """The stored summary of a run already completed with this config, else None."""
  if start_step != total_steps or config_diffs:
    return None
  summary = read_summary(workdir)
  if not summary or summary.get("status") != "completed" or summary.get("step") != total_steps:
    return None
  logging.info("run in %s already completed (step %d); nothing to do", workdir, total_steps)
  return summary


def _run(built: _Built, workdir, checkpointer, host_state, train_iterator, start_step, *,
         config_diffs, extra_hooks, interactive, t_start, stop) -> dict:
  """Everything after building and restoring: the session's outputs, the loop, the
  summary (the caller closes the iterator and the checkpointer)."""
  config, ds, model = built.config, built.ds, built.model
  devices, is_main = jax.local_devices(), jax.process_index() == 0
  hooks = tuple(build_hooks(config, model, ds, last_step=built.total_steps)) + tuple(
      extra_hooks)
  p_train, p_eval = make_steps(config, model, built.tx, ds.info.num_classes)
  run = _Run(config=config, workdir=workdir, ds=ds, devices=devices, is_main=is_main,
             total_steps=built.total_steps, schedule=built.schedule,
             p_train=p_train, p_eval=p_eval, hooks=hooks,
             probe_batch=_probe_batch(config, ds) if hooks else None,
             checkpointer=checkpointer,
             writer=MetricsWriter(workdir, is_main, resume_step=start_step),
             start_step=start_step, num_params=count_params(host_state.params))
  rs = RunState(state=distributed.replicate(host_state, devices), step=start_step or 0,
                iterator_state=train_iterator.get_state(), session_step0=start_step or 0)
  del host_state
  if start_step is not None:   # the summary keeps what the earlier sessions logged
    records = read_records(workdir)
    rs.latest = {k: r.as_dict() for k, r in latest_by_kind(records).items()
                 if k in ("train", "eval")}
    rs.probes = latest_probes(records)
  _start_session(run, rs, config_diffs)
  _loop(run, rs, _batches(train_iterator, devices), interactive, stop)
  summary = _summary(run, rs, t_start)
  if is_main:
    write_summary(workdir, summary)
  return summary


def _probe_batch(config, ds):
  size = min(config.probes.batch_size, ds.info.num_train)
  if size < config.probes.batch_size:
    logging.warning("probes.batch_size=%d exceeds the %d training examples: probing on "
                    "all %d", config.probes.batch_size, ds.info.num_train, size)
  return ds.probe_batch(size)


def _start_session(run: _Run, rs: RunState, config_diffs) -> None:
  """Start events and log line; config.json; a new run's step-0 checkpoint and probes."""
  step0 = run.start_step or 0
  if config_diffs:
    run.writer.event(step0, "config_override", differences=config_diffs)
  run.writer.event(step0, "resumed" if run.start_step is not None else "start",
                   num_train_steps=run.total_steps, num_params=run.num_params,
                   process_count=jax.process_count(), device_count=jax.device_count(),
                   dataset=str(run.ds.info.name))
  logging.info("%s %s: %d params, %d steps, %d device(s) x %d process(es), workdir %s",
               "resuming at step %d of" % run.start_step if run.start_step is not None
               else "training", run.config.model.name, run.num_params, run.total_steps,
               len(run.devices), jax.process_count(), run.workdir)
  if run.is_main:  # only now: a run that failed to start does not claim the workdir
    write_json_atomic(os.path.join(run.workdir, CONFIG_FILE), config_as_dict(run.config))
  if run.start_step is None:  # a diverged or killed run always has a checkpoint to go back to
    _save_checkpoint(run, rs)
    _run_hooks(run, rs)


def _due(run: _Run, step: int, stop: _StopRequest) -> _Due:
  c, is_last = run.config, step == run.total_steps
  log = step % c.log_every_steps == 0 or is_last
  stopping = stop.signal_name is not None
  if jax.process_count() > 1:  # all processes must agree, at the same steps
    stopping = distributed.any_process(stopping) if log else False
  return _Due(log=log, eval=step % c.eval_every_steps == 0 or is_last,
              checkpoint=step % c.checkpoint_every_steps == 0 or is_last or stopping,
              hooks=any(h.due(step, run.total_steps) for h in run.hooks), stopping=stopping)


def _loop(run: _Run, rs: RunState, batches, interactive, stop: _StopRequest) -> None:
  """Steps until done, diverged or stopped (`stop` holds a SIGTERM/SIGINT received since
  the session started). Order at a boundary: close the logging window (divergence
  check), hooks, evaluation, checkpoint, stop."""
  progress = Progress(run.total_steps, rs.step, enabled=run.is_main, interactive=interactive)
  while rs.step < run.total_steps:
    batch, rs.iterator_state = next(batches)
    rs.state, metrics = run.p_train(rs.state, batch)
    rs.step += 1
    rs.pending.append(metrics)
    if rs.step == rs.session_step0 + 1:   # rates exclude the compiling first step
      jax.block_until_ready(metrics)
      rs.window_t0 = rs.session_t0 = time.time()
    else:
      rs.window_steps += 1
    progress.update()
    due = _due(run, rs.step, stop)
    if not due.anything:
      continue
    if not _close_window(run, rs, due.log, progress):
      break
    if due.hooks:
      _run_hooks(run, rs)
    if due.eval:
      rs.latest["eval"] = run.writer.write(rs.step, "eval", evaluate(
          run.p_eval, rs.state, run.ds, run.devices))
      progress.report(rs.latest["eval"])
    if due.checkpoint:
      _save_checkpoint(run, rs)
    if due.stopping:
      _stopped(run, rs, stop.signal_name)
      break
  progress.close()


def _close_window(run: _Run, rs: RunState, log_due: bool, progress: Progress) -> bool:
  """Fetches the metrics of the steps since the last boundary (nothing is evaluated,
  probed or saved before it is known to be finite); writes the train record when due or
  diverged. False when a step diverged (then `rs` says where)."""
  fetched = [distributed.first_replica(m) for m in rs.pending]
  first = rs.step - len(rs.pending)
  rs.pending = []
  rs.window += fetched
  bad_index, bad_keys = _first_nonfinite(fetched)
  if log_due or bad_index is not None:
    rs.latest["train"] = run.writer.write(rs.step, "train", _window_record(run, rs))
    progress.report(rs.latest["train"])
    rs.window, rs.window_t0, rs.window_steps = [], time.time(), 0
  if bad_index is None:
    return True
  rs.status, rs.diverged_step = "diverged", first + bad_index + 1
  rs.details = {"diverged_step": rs.diverged_step, "nonfinite": bad_keys}
  logging.warning("diverged: non-finite %s at step %d; last finite checkpoint: %s",
                  ", ".join(bad_keys), rs.diverged_step, run.checkpointer.latest_step())
  return False


def _window_record(run: _Run, rs: RunState) -> dict:
  """Means over the logging window, the last learning rate and the window's rate."""
  elapsed = time.time() - rs.window_t0
  rate = rs.window_steps / elapsed if elapsed > 0 and rs.window_steps else None
  means = {k: float(np.mean([m[k] for m in rs.window])) for k in rs.window[0]}
  return {**means, "learning_rate": float(run.schedule(rs.step - 1)),
          "window_steps": len(rs.window), "steps_per_sec": rate,
          "examples_per_sec": rate and rate * run.config.data.batch_size}


def _run_hooks(run: _Run, rs: RunState) -> None:
  """Runs the hooks due at `rs.step` on the host variables, timing each."""
  variables = None
  for hook in run.hooks:
    if not hook.due(rs.step, run.total_steps):
      continue
    t0 = time.time()
    if variables is None:
      variables = distributed.first_replica(rs.state.variables())
    result = hook(rs.step, variables, run.probe_batch)
    run.writer.write(rs.step, "probe", {"hook": hook.name, **result})
    rs.probes[hook.name] = probe_scalars(rs.step, to_json_value(dict(result)))
    rs.hook_time_s[hook.name] = rs.hook_time_s.get(hook.name, 0.0) + time.time() - t0


def _save_checkpoint(run: _Run, rs: RunState) -> None:
  states = distributed.allgather_json(rs.iterator_state)
  run.checkpointer.save(rs.step, distributed.first_replica(rs.state), states)
  run.writer.event(rs.step, "checkpoint")


def _stopped(run: _Run, rs: RunState, signal_name: Optional[str]) -> None:
  rs.status = "preempted"
  rs.details = {"signal": signal_name or "another process"}
  logging.warning("%s: checkpoint saved at step %d in %s; rerun the same command to "
                  "resume", signal_name or "stop requested by another process", rs.step,
                  run.checkpointer.directory)


def _summary(run: _Run, rs: RunState, t_start: float) -> dict:
  """Waits for the last checkpoint, writes the final event and builds the summary."""
  run.checkpointer.wait()
  train_time = time.time() - rs.session_t0
  steps_done = rs.step - rs.session_step0 - 1   # after the compiling first step
  run.writer.event(rs.step, rs.status, **rs.details)
  run.writer.close()
  wall = time.time() - t_start
  rate = steps_done / train_time if steps_done > 0 and rs.session_t0 else None
  final = {f"{kind}_{key}": rs.latest.get(kind, {}).get(key)
           for kind in ("train", "eval") for key in ("loss", ACCURACY)}
  return {
      "status": rs.status, "step": rs.step, "num_train_steps": run.total_steps,
      "diverged_step": rs.diverged_step, "final": final, "wall_time_s": wall,
      "steps_per_sec": rate,
      "examples_per_sec": rate and rate * run.config.data.batch_size,
      "resumed_from_step": run.start_step, "num_params": run.num_params,
      "process_count": jax.process_count(), "device_count": jax.device_count(),
      "last_checkpoint_step": run.checkpointer.latest_step(),
      "probes": rs.probes, "hook_time_s": dict(rs.hook_time_s),
      "probe_time_share": sum(rs.hook_time_s.values()) / wall if wall > 0 else None,
  }
