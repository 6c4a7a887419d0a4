"""What every kind of trained run shares when loaded from its workdir (the image API,
``api.py``, and the speech API, ``audio/api.py``): its config, a default mesh, the check that
a stage was trained, and sampler settings for one request."""

from __future__ import annotations

import json
import os
from typing import Optional

import ml_collections

from resgen_jax import config_base, stages
from resgen_jax.generator import sampler as sampler_lib
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import trainer


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was run with (``DIR/config.json``); FileNotFoundError naming the
  workdir when it has none."""
  path = os.path.join(workdir, stages.run_config.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} is not a run's workdir: it has no {stages.run_config.CONFIG_FILE} "
                            f"(train it with python -m resgen_jax.main --workdir={workdir})")
  with open(path) as f:
    return config_base.config_from_json(json.load(f))


def default_mesh(config: ml_collections.ConfigDict):
  """Every device on the batch axis: inference needs no model parallelism here, and the
  run's sharding rules drop the axes this mesh lacks."""
  del config
  return mesh_lib.make_mesh((mesh_lib.DATA_AXIS,), (-1,))


def check_trained(workdir: str, stage: str) -> None:
  """A FileNotFoundError naming the stage unless ``workdir`` holds a checkpoint of it."""
  if trainer.latest_checkpoint_step(os.path.join(workdir, stage)) is None:
    raise FileNotFoundError(f"{workdir} has no trained {stage} (no checkpoint under "
                            f"{os.path.join(workdir, stage, trainer.CHECKPOINT_DIR)}); train "
                            f"it first")


def sampler_config(config: ml_collections.ConfigDict, mesh, count: int,
                   batch_size: Optional[int] = None, seed: int = 0,
                   **overrides) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``sampler`` updated for drawing ``count`` items on ``mesh``:
  ``seed``, ``batch_size`` (default: the run's, or ``count`` rounded up to the batch shards
  when fewer) and the ``overrides`` that are not None (any sampler field). Unknown fields
  and values out of range are a ValueError naming them."""
  config = config.copy_and_resolve_references()
  scfg = config.sampler
  unknown = sorted(k for k in overrides if k not in scfg)
  if unknown:
    raise ValueError(f"unknown sampler settings {unknown}; the sampler has {sorted(scfg)}")
  scfg.update({k: v for k, v in overrides.items() if v is not None})
  shards = mesh_lib.batch_shards(mesh)
  if batch_size is None:
    batch_size = min(scfg.batch_size, -(-count // shards) * shards)
  scfg.update(batch_size=batch_size, seed=seed)
  sampler_lib.check_settings(scfg)
  mesh_lib.check_batch_size(scfg.batch_size, mesh)
  return config
