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
import math
import os
import signal
import time
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from lipnorm.training import distributed
from lipnorm.training.checkpointing import Checkpointer
from lipnorm.training.config_schema import ConfigError, check_batch_sizes, validate_config
from lipnorm.training.hooks import Hook, build_hooks, run_hooks
from lipnorm.training.metrics_writer import METRICS_FILE, MetricsWriter, Progress, read_metrics
from lipnorm.training.optim import make_optimizer, make_schedule
from lipnorm.training.state import build_model, count_params, create_train_state
from lipnorm.training.steps import make_steps
from lipnorm.training.workdir import (CONFIG_FILE, SUMMARY_FILE, check_config,
                                      config_as_dict, write_json_atomic)

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
  from lipnorm.data import get_dataset  # the data engineer's pipeline
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
  """Eval-mode loss and accuracy over a whole split (padding masked out)."""
  sums = None
  for batch in ds.eval_batches(split=split):
    out = p_eval(state, distributed.shard_batch(batch, devices))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  if sums is None:
    raise ValueError(f"evaluation split {split!r} yielded no batches")
  s = distributed.first_replica(sums)
  count = float(s["count"])
  return {"split": split, "loss": float(s["loss_sum"]) / count,
          "accuracy": float(s["correct"]) / count, "num_examples": int(count)}


def _first_nonfinite(host_metrics: list[dict]) -> tuple[Optional[int], list[str]]:
  """Index of the first step whose loss or grad_norm is non-finite, and those keys."""
  for i, m in enumerate(host_metrics):
    bad = [k for k in ("loss", "grad_norm") if not np.isfinite(m[k])]
    if bad:
      return i, bad
  return None, []


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

  Returns the summary dict also written to `<workdir>/summary.json`: status, step,
  num_train_steps, diverged_step, final (train_loss, train_accuracy, eval_loss,
  eval_accuracy: the last logged values), wall_time_s (this call, start-up included),
  steps_per_sec and examples_per_sec (this call's updates after its first, compiling,
  one, evaluation and checkpointing included), resumed_from_step, num_params,
  process_count, device_count, last_checkpoint_step, probes (each hook's latest scalar
  results and their step, e.g. summary["probes"]["lipschitz"]["eval/lip_x_max"]).
  Raises ConfigError (a ValueError) for bad config values, before any training.
  """
  t_start = time.time()
  config = ml_collections.ConfigDict(config.to_dict()) if not isinstance(
      config, ml_collections.ConfigDict) else config.copy_and_resolve_references()
  validate_config(config)
  distributed.maybe_initialize(config.distributed)
  check_batch_sizes(config, jax.device_count(), jax.process_count())

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config_diffs = check_config(workdir, config, override_config)
  if jax.process_count() > 1:  # everyone has read the old config before it is replaced
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("lipnorm_config_checked")

  try:
    ds = (dataset_fn or _default_dataset_fn)(
        config.data, seed=config.seed, num_local_devices=jax.local_device_count(),
        process_index=jax.process_index(), process_count=jax.process_count())
  except ValueError as e:  # bad data settings or missing files: a config problem
    raise ConfigError(f"config.data (source {config.data.source!r}): {e}") from None
  info = ds.info
  total_steps = num_train_steps(config, info.num_train)
  model = build_model(config, info.num_classes)
  tx = make_optimizer(config, total_steps)
  host_state = jax.device_get(create_train_state(model, tx, info.image_shape, config.seed))

  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
  start_step = checkpointer.latest_step()
  iterator_state = None
  try:
    if start_step is not None:
      host_state, iterator_state = checkpointer.restore(start_step, host_state)
    train_iterator = ds.train_iterator(iterator_state)  # checks the position fits the data
  except (ValueError, KeyError, TypeError) as e:
    checkpointer.close()
    if start_step is None:
      raise
    raise ConfigError(
        f"cannot resume {checkpointer.directory}/{start_step} with this config "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); a config "
        f"that changes the model, optimizer or data needs a new workdir") from None
  try:
    return _run(config, workdir, ds, model, tx, host_state, checkpointer, train_iterator,
                start_step, config_diffs=config_diffs, extra_hooks=extra_hooks,
                interactive=interactive, t_start=t_start)
  finally:
    if hasattr(train_iterator, "close"):  # stops lipnorm.data's prefetch thread
      train_iterator.close()
    checkpointer.close()


def _run(config, workdir, ds, model, tx, host_state, checkpointer, train_iterator,
         start_step, *, config_diffs, extra_hooks, interactive, t_start) -> dict:
  """The part of `train` after everything is built and restored: the loop and its
  outputs (the caller closes the iterator and the checkpointer)."""
  info, devices, is_main = ds.info, jax.local_devices(), jax.process_index() == 0
  total_steps = num_train_steps(config, info.num_train)
  schedule = make_schedule(config, total_steps)
  writer = MetricsWriter(workdir, is_main, resume_step=start_step)
  last = {r["kind"]: r for r in read_metrics(os.path.join(workdir, METRICS_FILE))
          if r["kind"] in ("train", "eval")} if start_step is not None else {}
  if config_diffs:
    writer.event(start_step or 0, "config_override", differences=config_diffs)
  num_params = count_params(host_state.params)
  writer.event(start_step or 0, "resumed" if start_step is not None else "start",
               num_train_steps=total_steps, num_params=num_params,
               process_count=jax.process_count(), device_count=jax.device_count(),
               dataset=str(info.name))
  logging.info("%s %s: %d params, %d steps, %d device(s) x %d process(es), workdir %s",
               "resuming at step %d of" % start_step if start_step is not None else "training",
               config.model.name, num_params, total_steps, len(devices), jax.process_count(),
               workdir)

  state = distributed.replicate(host_state, devices)
  del host_state
  p_train, p_eval = make_steps(config, model, tx, info.num_classes)
  hooks = build_hooks(config, model, ds) + list(extra_hooks)
  probe_batch = None
  if hooks:
    probe_size = min(config.probes.batch_size, ds.info.num_train)
    if probe_size < config.probes.batch_size:
      logging.warning("probes.batch_size=%d exceeds the %d training examples: probing on "
                      "all %d", config.probes.batch_size, ds.info.num_train, probe_size)
    probe_batch = ds.probe_batch(probe_size)
  iterator_state = train_iterator.get_state()
  batches = _batches(train_iterator, devices)
  step = start_step or 0

  def save_checkpoint(at_step, it_state):
    states = distributed.allgather_json(it_state)
    checkpointer.save(at_step, distributed.first_replica(state), states)
    writer.event(at_step, "checkpoint")

  def host_variables():
    return distributed.first_replica(state.variables())

  last_probes: dict[str, dict] = {}   # each hook's latest scalars, for the summary

  def run_probes(at_step):
    for name, result in run_hooks(hooks, at_step, total_steps, host_variables(), probe_batch):
      writer.write(at_step, "probe", {"hook": name, **result})
      last_probes[name] = {"step": at_step, **{k: v for k, v in result.items()
                                               if isinstance(v, (int, float))}}

  if is_main:  # only now: a run that failed to start does not claim the workdir
    write_json_atomic(os.path.join(workdir, CONFIG_FILE), config_as_dict(config))
  if start_step is None:  # a diverged or killed run always has a checkpoint to go back to
    save_checkpoint(0, iterator_state)
    run_probes(0)

  status, diverged_step, details = "completed", None, {}
  pending, window = [], []  # device metrics not yet fetched; host metrics of the window
  # Rates exclude this session's first step, which includes compilation.
  rate_t0, rate_steps, session_t0, step0 = time.time(), 0, time.time(), step
  progress = Progress(total_steps, step, enabled=is_main, interactive=interactive)
  stop = _StopRequest()
  with stop.installed():
    while step < total_steps:
      batch, iterator_state = next(batches)
      state, metrics = p_train(state, batch)
      step += 1
      pending.append(metrics)
      if step == step0 + 1:
        jax.block_until_ready(metrics)
        rate_t0 = session_t0 = time.time()
      else:
        rate_steps += 1
      progress.update()

      is_last = step == total_steps
      log_due = step % config.log_every_steps == 0 or is_last
      stopping = stop.signal_name is not None
      if jax.process_count() > 1:  # all processes must agree, at the same steps
        stopping = distributed.any_process(stopping) if log_due else False
      eval_due = step % config.eval_every_steps == 0 or is_last
      ckpt_due = step % config.checkpoint_every_steps == 0 or is_last or stopping
      hooks_due = any(h.due(step, total_steps) for h in hooks)
      if not (log_due or eval_due or ckpt_due or hooks_due):
        continue

      # Fetch what ran since the last boundary; nothing is evaluated, probed or saved
      # before it is known to be finite.
      first = step - len(pending)
      fetched = [distributed.first_replica(m) for m in pending]
      pending = []
      window += fetched
      bad_index, bad_keys = _first_nonfinite(fetched)
      if log_due or bad_index is not None:
        elapsed = time.time() - rate_t0
        rate = rate_steps / elapsed if elapsed > 0 and rate_steps else None
        means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        last["train"] = writer.write(step, "train", {
            **means, "learning_rate": float(schedule(step - 1)),
            "window_steps": len(window), "steps_per_sec": rate,
            "examples_per_sec": rate and rate * config.data.batch_size})
        progress.report(last["train"])
        window, rate_t0, rate_steps = [], time.time(), 0
      if bad_index is not None:
        status, diverged_step = "diverged", first + bad_index + 1
        details = {"diverged_step": diverged_step, "nonfinite": bad_keys}
        logging.warning("diverged: non-finite %s at step %d; last finite checkpoint: %s",
                        ", ".join(bad_keys), diverged_step, checkpointer.latest_step())
        break
      if hooks_due:
        run_probes(step)
      if eval_due:
        last["eval"] = writer.write(step, "eval", evaluate(p_eval, state, ds, devices))
        progress.report(last["eval"])
      if ckpt_due:
        save_checkpoint(step, iterator_state)
      if stopping:
        status = "preempted"
        details = {"signal": stop.signal_name or "another process"}
        logging.warning("%s: checkpoint saved at step %d in %s; rerun the same command to "
                        "resume", stop.signal_name or "stop requested by another process",
                        step, checkpointer.directory)
        break
  progress.close()
  checkpointer.wait()
  last_checkpoint = checkpointer.latest_step()
  train_time = time.time() - session_t0
  steps_done = step - step0 - 1   # after the compiling first step
  writer.event(step, status, **details)
  writer.close()

  final = {}
  for kind in ("train", "eval"):
    for key in ("loss", "accuracy"):
      final[f"{kind}_{key}"] = last.get(kind, {}).get(key)
  summary = {
      "status": status, "step": step, "num_train_steps": total_steps,
      "diverged_step": diverged_step, "final": final,
      "wall_time_s": time.time() - t_start,
      "steps_per_sec": steps_done / train_time if steps_done > 0 else None,
      "examples_per_sec": (steps_done * config.data.batch_size / train_time
                           if steps_done > 0 else None),
      "resumed_from_step": start_step, "num_params": num_params,
      "process_count": jax.process_count(), "device_count": jax.device_count(),
      "last_checkpoint_step": last_checkpoint,
      "probes": last_probes,
  }
  if is_main:
    write_json_atomic(os.path.join(workdir, SUMMARY_FILE), summary)
  return summary
