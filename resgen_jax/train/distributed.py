"""Multi-process start-up: ``jax.distributed.initialize`` from flags, the environment, or
the cluster.

Every process of a multi-host run executes the same program; after initialisation
``jax.devices()`` lists the devices of all of them and meshes span hosts. Where the
settings come from, first match wins:

1. ``--coordinator_address`` / ``--num_processes`` / ``--process_id`` (main.py flags);
2. the environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
3. ``RESGEN_DISTRIBUTED=auto`` (set by ``launch/tpu_pod.sh``: a TPU VM finds its pod's
   workers through the metadata server, not the environment), a SLURM job step with more
   than one task, or ``TPU_WORKER_HOSTNAMES`` naming several workers: JAX's own cluster
   detection fills in everything;
4. otherwise a single process (nothing to initialise).
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_AUTO = "RESGEN_DISTRIBUTED"  # "auto": let JAX detect the cluster


def _int(value, name: str) -> Optional[int]:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def resolve(coordinator_address: Optional[str], num_processes: Optional[int],
            process_id: Optional[int], env: Mapping[str, str]) -> Optional[dict]:
  """The keyword arguments for ``jax.distributed.initialize``: ``None`` for a single
  process, ``{}`` to let JAX detect the cluster, or the explicit three settings."""
  address = coordinator_address or env.get(ENV_ADDRESS) or None
  count = num_processes if num_processes is not None else _int(env.get(ENV_COUNT), ENV_COUNT)
  index = process_id if process_id is not None else _int(env.get(ENV_ID), ENV_ID)
  if address:
    if count is None or index is None:
      raise ValueError(
          f"a coordinator address ({address}) needs the process count and this process's "
          f"id too (--num_processes and --process_id, or {ENV_COUNT} and {ENV_ID})")
    if count < 1 or not 0 <= index < count:
      raise ValueError(f"process id {index} must lie in [0, {count}) and the count be >= 1")
    return dict(coordinator_address=address, num_processes=count, process_id=index)
  if count is not None or index is not None:
    raise ValueError("a process count or id was given without a coordinator address "
                     f"(--coordinator_address or {ENV_ADDRESS})")
  auto = env.get(ENV_AUTO, "")
  if auto not in ("", "auto"):
    raise ValueError(f"{ENV_AUTO} must be 'auto' or unset, got {auto!r}")
  if auto == "auto":
    return {}
  slurm_tasks = _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"), "SLURM_NTASKS")
  tpu_workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if (slurm_tasks or 1) > 1 or len(tpu_workers) > 1:
    return {}
  return None


def initialize(settings: Optional[dict]) -> None:
  """Joins the process group ``settings`` describes (see :func:`resolve`); call before
  anything else touches JAX devices. CPU processes exchange data through gloo."""
  if settings is None:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**settings)
