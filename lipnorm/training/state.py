"""The model built from a config and the training state (one pytree, checkpointed whole)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from lipnorm.bn_modes import GLOBAL
from lipnorm.models import get_model
from lipnorm.training.config_schema import model_kwargs

AXIS_NAME = "batch"  # the pmap axis: gradients, metrics and global BN statistics reduce over it


def build_model(config, num_classes: int, *, pmap: bool = True):
  """`config.model` -> a linen module. With `bn_stats="global"` and a BatchNorm model, the
  training model (`pmap=True`) gets `bn_axis_name=AXIS_NAME`, so its batch statistics
  are those of the global batch. `pmap=False` gives the same model for use outside
  pmap (probes, measurements): same parameters, no axis."""
  kwargs = model_kwargs(config)
  if pmap and config.model.norm == "batch" and config.bn_stats == GLOBAL:
    kwargs["bn_axis_name"] = AXIS_NAME
  if config.dtype != "float32":
    kwargs["dtype"] = jnp.dtype(config.dtype)
  return get_model(config.model.name, num_classes=num_classes, **kwargs)


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data-iterator position.

  step: int32 scalar, optimizer updates done. params / batch_stats: model collections
  (batch_stats is `{}` for models without BatchNorm). opt_state: optax state.
  rng: uint32 `[2]` raw key data; the dropout key of update `step` on device `d` is
  `fold_in(fold_in(rng, step), d)`, so no RNG state has to advance.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  def variables(self) -> dict:
    """The `variables` dict for `model.apply`."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


def create_train_state(model, tx: optax.GradientTransformation, image_shape, seed: int
                       ) -> TrainState:
  """Initializes parameters on the host from `seed` (every process gets the same ones)."""
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))

  @jax.jit
  def init(key):
    variables = model.init({"params": key, "dropout": key},
                           jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return params, variables.get("batch_stats", {}), tx.init(params)

  params, batch_stats, opt_state = init(init_key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=flax.core.unfreeze(batch_stats), opt_state=opt_state,
                    rng=jnp.asarray(dropout_key, jnp.uint32))


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
