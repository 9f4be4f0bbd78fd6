"""pmap'd train and eval steps over the local devices, reducing over `AXIS_NAME`.

Shapes: a train batch is `{"image": [D, B/D, H, W, C], "label": [D, B/D]}` with D local
devices and B the process's share of the global batch; an eval batch adds
`"mask": [D, B/D]` (0 on padding). The state is replicated: every leaf has a leading
`[D]` axis holding identical copies.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from lipnorm.losses import cross_entropy
from lipnorm.training.state import AXIS_NAME, TrainState


def _apply_train(model, state: TrainState, params, images, rng):
  """Train-mode forward pass; returns (logits float32, new batch_stats)."""
  variables = {"params": params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": rng})
    return logits.astype(jnp.float32), updates["batch_stats"]
  logits = model.apply(variables, images, train=True, rngs={"dropout": rng})
  return logits.astype(jnp.float32), state.batch_stats


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               num_classes: int, label_smoothing: float, bn_stats: str
               ) -> tuple[TrainState, dict]:
  """One optimizer update on one device's shard (call under pmap with AXIS_NAME).

  Gradients are averaged over all devices (so they are those of the global-batch mean
  loss); with `bn_stats="per_device"` the running BN statistics are averaged as well,
  keeping replicas identical (with "global" they already are: BN synced its batch
  statistics). Metrics (global means): loss, accuracy, grad_norm (before clipping).
  """
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                           jax.lax.axis_index(AXIS_NAME))

  def loss_fn(params):
    logits, new_stats = _apply_train(model, state, params, batch["image"], key)
    loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
    return loss, (logits, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = jax.lax.pmean(grads, AXIS_NAME)
  if bn_stats == "per_device":
    new_stats = jax.lax.pmean(new_stats, AXIS_NAME)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
  }
  metrics = jax.lax.pmean(metrics, AXIS_NAME)
  metrics["grad_norm"] = optax.tree.norm(grads)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                            opt_state=opt_state)
  return new_state, metrics


def eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int
              ) -> dict:
  """`loss_sum`, `correct`, `count` of logits `[N, C]` over the examples with mask 1. An
  example with non-finite logits counts as wrong with infinite loss (a diverged net must
  not look accurate)."""
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  loss = cross_entropy(jnp.where(finite[:, None], logits, 0.0), labels, num_classes)
  loss = jnp.where(finite, loss, jnp.inf)
  right = (jnp.argmax(logits, -1) == labels) & finite
  return {"loss_sum": jnp.sum(jnp.where(mask > 0, loss, 0.0)),
          "correct": jnp.sum(right * mask), "count": jnp.sum(mask)}


def eval_metrics(sums: Iterable[dict], to_host: Callable[[dict], dict] = lambda t: t
                 ) -> dict:
  """Sums `eval_sums` results (on device; `to_host` then maps the total to host scalars,
  e.g. `distributed.first_replica`) -> {"loss", "accuracy", "num_examples"}: the one
  place evaluation numbers are formed."""
  total = None
  for s in sums:
    total = s if total is None else jax.tree.map(lambda a, b: a + b, total, s)
  if total is None:
    raise ValueError("evaluation got no batches")
  total = to_host(total)
  count = float(total["count"])
  return {"loss": float(total["loss_sum"]) / count,
          "accuracy": float(total["correct"]) / count, "num_examples": int(count)}


def eval_step(state: TrainState, batch: dict, *, model, num_classes: int) -> dict:
  """Eval-mode (running BN statistics) `eval_sums` over the global batch, padding masked
  out (call under pmap with AXIS_NAME)."""
  logits = model.apply(state.variables(), batch["image"], train=False)
  return jax.lax.psum(eval_sums(logits, batch["label"], batch["mask"], num_classes),
                      AXIS_NAME)


def make_steps(config, model, tx, num_classes: int, devices=None
               ) -> tuple[Callable, Callable]:
  """(p_train_step, p_eval_step): pmapped over `devices` (default: every device of every
  process; an explicit list confines the collectives to those devices, so pass one only
  in a single process, e.g. to time 1 of 4 devices); the train step donates the
  incoming state's buffers."""
  p_train = jax.pmap(
      functools.partial(train_step, model=model, tx=tx, num_classes=num_classes,
                        label_smoothing=float(config.label_smoothing),
                        bn_stats=config.bn_stats),
      axis_name=AXIS_NAME, donate_argnums=(0,), devices=devices)
  p_eval = jax.pmap(functools.partial(eval_step, model=model, num_classes=num_classes),
                    axis_name=AXIS_NAME, devices=devices)
  return p_train, p_eval
