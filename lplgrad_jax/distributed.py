"""Multi-host campaigns through JAX's multi-controller runtime (`jax.distributed`).

Every host runs the same command with the same configuration; after
`initialize` the processes see one mesh over all their devices, and every
jitted step is one SPMD program over it. What keeps them in agreement:
  - every random choice comes from the shared seed (`fold_in(seed, ...)`), and
    every process loads the same pool in the same order, so all compute the
    same subsets, batches and selections;
  - query scores leave the devices replicated (gathered over all processes)
    before the host takes the top-k;
  - only process 0 writes results.json, the plot, TensorBoard logs, query
    files and progress; checkpoints are saved and restored by all processes
    together (Orbax writes each process's shards, process 0 the JSON).
The workdir must be one directory every host sees (a shared file system).
"""

from __future__ import annotations

import collections

import jax
import numpy as np
from jax.experimental import multihost_utils

from lplgrad_jax.errors import ConfigError


def initialize(dist_config) -> None:
  """Starts the runtime if `config.distributed.initialize`; before any other JAX call.

  Unset fields are left to JAX's cluster detection (SLURM, Open MPI, Cloud TPU,
  GKE), which fills in the coordinator, the number of processes and this
  process's id from the environment.
  """
  if not dist_config.initialize or jax.distributed.is_initialized():
    return
  # CPU devices of different processes talk through gloo (accelerators use their own).
  jax.config.update("jax_cpu_collectives_implementation", dist_config.cpu_collectives)
  where = (
    f"coordinator {dist_config.coordinator_address or '(from the environment)'}, "
    f"process {dist_config.process_id if dist_config.process_id >= 0 else '(auto)'}"
  )
  try:
    jax.distributed.initialize(
      coordinator_address=dist_config.coordinator_address or None,
      num_processes=dist_config.num_processes or None,
      process_id=dist_config.process_id if dist_config.process_id >= 0 else None,
      initialization_timeout=dist_config.initialization_timeout_seconds,
      heartbeat_timeout_seconds=dist_config.heartbeat_timeout_seconds,
      shutdown_timeout_seconds=dist_config.shutdown_timeout_seconds,
    )
  except (RuntimeError, ValueError) as e:
    reason = " ".join(str(e).split())[:300]
    raise ConfigError(f"cannot start jax.distributed ({where}): {reason}") from None


def is_main_process() -> bool:
  return jax.process_index() == 0


def device_summary() -> str:
  """The devices a campaign runs on, e.g. `8 x NVIDIA H100 80GB HBM3 (gpu)`, `1 x cpu`.

  Touches the devices: call after `initialize`.
  """
  devices = jax.devices()
  kinds = collections.Counter(d.device_kind for d in devices)
  platform = devices[0].platform
  text = ", ".join(
    f"{n} x {kind}" + ("" if kind.lower() == platform else f" ({platform})")
    for kind, n in kinds.items()
  )
  return text + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")


def say(*args, **kwargs) -> None:
  """Prints on process 0 only: one progress log per campaign, not one per host."""
  if is_main_process():
    print(*args, **{"flush": True, **kwargs})


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to wait for alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def sum_over_processes(values: np.ndarray) -> np.ndarray:
  """The sum over all processes of a float64 host array, to float64 precision.

  Sent as raw bytes: as a JAX array float64 would become float32.
  """
  values = np.ascontiguousarray(values, np.float64)
  if jax.process_count() == 1:
    return values
  raw = multihost_utils.process_allgather(np.frombuffer(values.tobytes(), np.uint8))
  return (
    np.frombuffer(np.ascontiguousarray(raw).tobytes(), np.float64)
    .reshape((-1,) + values.shape)
    .sum(0)
  )
