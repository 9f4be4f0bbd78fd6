"""The extension point for measurements taken during training (layer probes, Lipschitz
estimates, Hessian eigenvalues: `lipnorm.probes` fills `build_hooks`).

A hook is called by the loop at step 0 (before the first update), every `hook.every`
updates, and at the last step, as

    hook(step, variables, probe_batch) -> {name: float | list[float]}

with `variables` the unreplicated host copy `{"params": ..., "batch_stats": ...}`
(batch_stats absent for models without BatchNorm) and `probe_batch` the fixed batch
`ds.probe_batch(config.probes.batch_size)`: `{"image": [n, H, W, C], "label": [n]}`.
The result is written as one JSONL record `{"step", "kind": "probe", "hook": hook.name,
...result}` and as TensorBoard scalars `probe/<key>` (lists as `probe/<key>/<i>`).
Hooks run on every process with identical inputs (so they may use collectives); only
process 0 writes. They must be pure with respect to the training state. The loop times
each call (`summary["hook_time_s"]`, `summary["probe_time_share"]`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Union

from lipnorm.probes.hooks import probe_hook_fns

HookResult = Mapping[str, Union[float, list]]


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(step, variables, probe_batch) -> dict` run every `every` steps, named `name`."""
  name: str
  every: int
  fn: Callable[[int, dict, dict], HookResult]

  def __post_init__(self):
    if not isinstance(self.every, int) or self.every < 1:
      raise ValueError(f"hook {self.name!r}: every={self.every!r} must be a positive int")

  def __call__(self, step: int, variables: dict, probe_batch: dict) -> HookResult:
    return self.fn(step, variables, probe_batch)

  def due(self, step: int, last_step: int) -> bool:
    return step == 0 or step == last_step or step % self.every == 0


def build_hooks(config, model, ds, last_step: int | None = None) -> list[Hook]:
  """The hooks `config.probes` asks for (`lipnorm.probes.hooks.probe_hook_fns`): layer
  statistics every `probes.every_steps` ("layers"; with the spectral norms every
  `probes.spectral_every_steps` and at `last_step`) and Lipschitz constants, bounds and
  the top Hessian eigenvalue every `probes.lipschitz_every_steps` ("lipschitz")."""
  return [Hook(name, every, fn) for name, every, fn in
          probe_hook_fns(config, model, ds.info.num_classes, last_step=last_step)]
