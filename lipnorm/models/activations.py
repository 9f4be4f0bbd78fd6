"""Activation functions by name, with their global Lipschitz constants (sup |phi'|)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from lipnorm.registry import Registry

ACTIVATIONS: Registry[tuple[Callable, float]] = Registry("activation")
ACTIVATIONS.register("relu")((nn.relu, 1.0))
ACTIVATIONS.register("leaky_relu")((nn.leaky_relu, 1.0))
ACTIVATIONS.register("tanh")((jnp.tanh, 1.0))
ACTIVATIONS.register("identity")((lambda x: x, 1.0))
ACTIVATIONS.register("sigmoid")((jax.nn.sigmoid, 0.25))
# sup_x |d/dx x*sigmoid(x)| = 1.0998393..., attained at x ~ 2.3994
ACTIVATIONS.register("swish")((nn.swish, 1.0998393))
# sup_x |d/dx x*Phi(x)| = 1.1289...; flax's default gelu is the tanh approximation, so
# use the exact erf form to keep the constant honest.
ACTIVATIONS.register("gelu")((lambda x: jax.nn.gelu(x, approximate=False), 1.1289))


def get_activation(name: str) -> tuple[Callable, float]:
  """(function, Lipschitz constant) for an activation name."""
  return ACTIVATIONS.get(name)
