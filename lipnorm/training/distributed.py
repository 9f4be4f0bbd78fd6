"""Multi-host setup and the few cross-device / cross-process helpers the loop needs.

`config.distributed.mode`:
  "off":  never call `jax.distributed.initialize` (one process).
  "on":   always call it, with `coordinator_address` / `num_processes` / `process_id` from
          the config where set; unset ones are auto-detected by JAX (Cloud TPU pods,
          SLURM, Open MPI, Kubernetes).
  "auto": call it when the run is evidently multi-process: an address in the config or
          in `JAX_COORDINATOR_ADDRESS`, a SLURM job with more than one task, an Open MPI
          launch with more than one rank, or a Cloud TPU slice with several workers
          (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` listing more than one host).
It must run before JAX touches a device. On CPU, cross-process collectives use gloo
(JAX's default CPU collectives implementation).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from lipnorm.training.state import AXIS_NAME


def _env_int(name: str) -> int:
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def cluster_requested(dcfg) -> bool:
  """Whether "auto" mode should initialize the distributed runtime (see module doc)."""
  if dcfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "SLURM_JOB_ID" in os.environ and _env_int("SLURM_NTASKS") > 1:
    return True
  if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
    return True
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
  return bool(hosts) and len(hosts.split(",")) > 1


def maybe_initialize(dcfg) -> bool:
  """Initializes `jax.distributed` per `config.distributed`; returns whether it is active."""
  if jax.distributed.is_initialized():
    return True
  if dcfg.mode == "off" or (dcfg.mode == "auto" and not cluster_requested(dcfg)):
    return False
  kwargs: dict[str, Any] = {"initialization_timeout": int(dcfg.initialization_timeout_s)}
  for key in ("coordinator_address", "num_processes", "process_id"):
    if dcfg[key] is not None:
      kwargs[key] = dcfg[key]
  logging.info("jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)
  return True


def _local_sharding(devices=None) -> jax.sharding.NamedSharding:
  """Leading axis split over the local devices, named like the pmap axis: exactly the
  sharding pmapped steps return, so the first call compiles the same program as later
  ones (a differently named mesh would cost a second compilation)."""
  devices = devices or jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS_NAME,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME))


def replicate(tree, devices=None):
  """Host pytree -> pytree whose leaves have a leading `[D]` axis on the local devices
  (the layout a pmapped function takes and returns)."""
  sharding = _local_sharding(devices)
  n = len(sharding.mesh.devices)
  return jax.tree.map(lambda x: jax.device_put(np.stack([np.asarray(x)] * n), sharding), tree)


def shard_batch(batch: dict, devices=None) -> dict:
  """`[D, ...]` host arrays -> device arrays split over the local devices (async copy)."""
  sharding = _local_sharding(devices)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def first_replica(tree):
  """Replicated (or per-device) pytree -> numpy copy of local device 0's slice."""
  def one(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)[0]
    shard = x.addressable_shards[0].data
    return np.asarray(shard).reshape(x.shape[1:])
  return jax.tree.map(one, tree)


def allgather_json(obj: Any) -> list[Any]:
  """Gathers one JSON-able object from every process, ordered by process index."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode())
          for row, n in zip(gathered, np.ravel(lengths))]


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any of them (a collective)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))
