"""Empirical lower bounds on the global input Lipschitz constant by gradient ascent.

`lower_bound_search` starts at each example of a batch and moves its input to increase
`||J_x f(x)||_2`. Every value it reports is `||J_x f(x)||_2` (or `||J v||` for a unit
v, which is smaller) at an actual input x, hence a valid lower bound of the global
Lipschitz constant `sup_x ||J_x f(x)||_2` (docs/theory.md#empirical-lower-bound).

The ascent objective at x is `F(x) = ||J_x f(x) v||` with v the top right singular
vector estimate, refreshed by a few power steps at each iterate (warm start). For
piecewise-linear nets (ReLU) J is piecewise constant and dF/dx = 0 almost everywhere,
so the default ascent direction is the gradient of the Gaussian-smoothed objective
`E_u F(x + s u)`, estimated with antithetic samples (`gradient="smoothed"`);
`gradient="autodiff"` uses dF/dx (second-order autodiff) for smooth nets.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lipnorm.lipschitz import model_info
from lipnorm.lipschitz.local import prepare_variables, example_apply, input_lipschitz

GRADIENTS = ("smoothed", "autodiff")


@struct.dataclass
class LowerBoundResult:
  """value: max over examples of the best local constant found (a valid lower bound of
  the global Lipschitz constant); input: the input attaining it (one example);
  per_example `[N]` and inputs `[N, ...]`: the best per starting point (exact local
  constants at those inputs, recomputed with `input_lipschitz`); initial `[N]`: the
  local constants at the starting points; history `[steps]`: the best running
  objective (max over the batch) after each step."""
  value: jax.Array
  input: jax.Array
  per_example: jax.Array
  inputs: jax.Array
  initial: jax.Array
  history: jax.Array


def _normalize(v):
  n = jnp.linalg.norm(v)
  return v / jnp.where(n > 0, n, 1.0)


def _project(x, x0, radius, box):
  """Euclidean projection of x [D] onto {||x - x0|| <= radius} ∩ box (either may be
  None; box = (low, high))."""
  if box is None:
    if radius is None:
      return x
    d = x - x0
    nd = jnp.linalg.norm(d)
    return x0 + d * jnp.minimum(1.0, radius / jnp.maximum(nd, 1e-30))
  if radius is None:
    return jnp.clip(x, box[0], box[1])
  # Clipping a ball projection can leave the ball when x0 lies outside the box. The
  # exact projection onto the intersection is clip((1 - t) x + t x0) for the smallest
  # t in [0, 1] that lands in the ball (KKT of the separable problem; the distance
  # to x0 falls as t grows), found by bisection. t = 1 is feasible: checked upfront.
  point = lambda t: jnp.clip((1 - t) * x + t * x0, box[0], box[1])
  inside = lambda t: jnp.linalg.norm(point(t) - x0) <= radius

  def bisect(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    ok = inside(mid)
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  zero, one = jnp.zeros((), x.dtype), jnp.ones((), x.dtype)
  _, hi = jax.lax.fori_loop(0, 40, bisect, (zero, one))
  return point(jnp.where(inside(zero), zero, hi))


@functools.partial(jax.jit, static_argnames=("model", "mode", "steps", "power_iters",
                                             "num_samples", "gradient", "learning_rate",
                                             "smoothing", "radius", "box"))
def _search(model, variables, xs, key, *, mode, steps, power_iters, num_samples,
            gradient, learning_rate, smoothing, radius, box):
  variables = prepare_variables(model, variables, xs, mode)
  apply_one = example_apply(model, mode)
  n, shape = xs.shape[0], xs.shape[1:]
  dim = math.prod(shape)
  idx = jnp.arange(n)

  def f(x, i):   # flat input -> flat output of example i
    return apply_one(variables, xs, x.reshape(shape), i).reshape(-1)

  def refine(x, v, i):
    """A few power steps on J^T J at x from v; returns the unit v."""
    _, lin = jax.linearize(lambda z: f(z, i), x)
    lin_t = jax.linear_transpose(lin, x)

    def body(_, v):
      return _normalize(lin_t(lin(v))[0])
    return jax.lax.fori_loop(0, power_iters, body, v)

  def objective(x, v, i):   # ||J_x v||: <= ||J_x||_2 for unit v
    return jnp.linalg.norm(jax.jvp(lambda z: f(z, i), (x,), (v,))[1])

  def ascent_dir(x, v, i, key):
    if gradient == "autodiff":
      return jax.grad(objective)(x, v, i)
    s = smoothing * jnp.sqrt(jnp.mean(jnp.square(x)) + 1e-12)
    u = jax.random.normal(key, (num_samples, dim), x.dtype)
    diff = jax.vmap(lambda u: objective(x + s * u, v, i) - objective(x - s * u, v, i))(u)
    return jnp.mean(diff[:, None] * u, axis=0) / (2 * s)

  opt = optax.adam(learning_rate)
  x0 = xs.reshape(n, dim)
  keys = jax.random.split(key, n)
  v = jax.vmap(lambda k: _normalize(jax.random.normal(k, (dim,), xs.dtype)))(keys)
  v = jax.vmap(refine)(x0, v, idx)
  val0 = jax.vmap(objective)(x0, v, idx)

  def step(carry, step_key):
    x, v, opt_state, best, best_x = carry
    v = jax.vmap(refine)(x, v, idx)
    val = jax.vmap(objective)(x, v, idx)
    better = val > best
    best = jnp.where(better, val, best)
    best_x = jnp.where(better[:, None], x, best_x)
    g = jax.vmap(ascent_dir)(x, v, idx, jax.random.split(step_key, n))
    updates, opt_state = opt.update(-g, opt_state, x)   # minimize -F
    x = jax.vmap(lambda x, x0: _project(x, x0, radius, box))(
        optax.apply_updates(x, updates), x0)
    return (x, v, opt_state, best, best_x), jnp.max(best)

  carry = (x0, v, opt.init(x0), val0, x0)
  (x, v, _, best, best_x), history = jax.lax.scan(
      step, carry, jax.random.split(jax.random.fold_in(key, 1), steps))
  v = jax.vmap(refine)(x, v, idx)
  val = jax.vmap(objective)(x, v, idx)
  better = val > best
  best_x = jnp.where(better[:, None], x, best_x)
  history = history.at[-1].max(jnp.max(val))
  return best_x.reshape(xs.shape), history


def lower_bound_search(model, variables: Mapping, xs: jax.Array, *, steps: int = 100,
                       bn_mode: Optional[str] = None, learning_rate: float = 1e-2,
                       gradient: str = "smoothed", smoothing: float = 0.05,
                       num_samples: int = 8, power_iters: int = 5,
                       radius: Optional[float] = None,
                       box: Optional[Sequence[float]] = None, key=None,
                       method: str = "auto") -> LowerBoundResult:
  """Gradient ascent (optax Adam, jit-compiled `lax.scan` over `steps`) on the inputs
  `xs` `[N, ...]` to increase the local Lipschitz constant (module docstring).

  Args:
    bn_mode: as in `input_lipschitz` (the search moves example i with the rest of the
      batch fixed in "batch_coupled").
    learning_rate: Adam step size (input units).
    gradient: "smoothed" (default; works for ReLU nets) or "autodiff".
    smoothing, num_samples: std of the Gaussian smoothing relative to the RMS of x, and
      antithetic sample pairs per step ("smoothed" only).
    power_iters: power steps per iterate refreshing the top singular vector.
    radius: optional l2 ball around each starting point to stay in; box: optional
      (low, high) clip of every input entry.
    method: for the final exact evaluation (`input_lipschitz`).

  Returns a `LowerBoundResult`; its `value` is the exact local constant at `input`.
  """
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient={gradient!r}; allowed: {', '.join(GRADIENTS)}")
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps={steps!r} must be a positive int")
  if radius is not None and not radius > 0:
    raise ValueError(f"radius={radius!r} must be > 0 or None")
  if box is not None:
    box = (float(box[0]), float(box[1]))
    if not box[0] < box[1]:
      raise ValueError(f"box={box!r} must be (low, high) with low < high")
    if radius is not None:   # the ball around each start must meet the box
      flat = jnp.asarray(xs).reshape(len(xs), -1)
      gap = jnp.linalg.norm(flat - jnp.clip(flat, box[0], box[1]), axis=1)
      if float(jnp.max(gap)) > radius:
        i = int(jnp.argmax(gap))
        raise ValueError(
            f"xs[{i}] lies {float(gap[i]):.4g} from box={box!r}, farther than "
            f"radius={radius!r}: the search region is empty")
  mode = model_info.resolve_bn_mode(model, variables, bn_mode)
  xs = jnp.asarray(xs)
  model_info.check_batch(model, variables, xs)
  key = jax.random.key(0) if key is None else key
  initial = input_lipschitz(model, variables, xs, bn_mode=bn_mode, method=method).value
  best_x, history = _search(model, variables, xs, key, mode=mode,
                            steps=steps,
                            power_iters=int(power_iters), num_samples=int(num_samples),
                            gradient=gradient, learning_rate=float(learning_rate),
                            smoothing=float(smoothing),
                            radius=None if radius is None else float(radius), box=box)
  # Exact constants at the moved inputs, with xs still defining the batch statistics /
  # the rest of the batch (the function the search ascended).
  per = input_lipschitz(model, variables, xs, bn_mode=bn_mode, method=method,
                        points=best_x).value
  keep = per >= initial
  per = jnp.where(keep, per, initial)
  inputs = jnp.where(keep.reshape((-1,) + (1,) * (xs.ndim - 1)), best_x, xs)
  i = int(jnp.argmax(per))
  return LowerBoundResult(value=per[i], input=inputs[i], per_example=per, inputs=inputs,
                          initial=initial, history=history)
