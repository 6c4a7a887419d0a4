"""Device mesh and shardings.

The mesh shape is a config field: ``config.mesh.axes`` names the axes and
``config.mesh.shape`` gives their sizes, with at most one ``-1`` meaning "all remaining
devices". The default is one ``data`` axis over every device (pure data parallelism).
Parameters are replicated; batches are sharded along their leading axis over the ``data``
axis. Batches are assembled as global arrays from each process's local shard.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple:
  """Replaces a single -1 in ``shape`` so the product equals ``num_devices``."""
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape {tuple(shape)} has more than one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape {tuple(shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh.shape {tuple(shape)} uses {math.prod(shape)} devices but {num_devices} exist")
  return tuple(shape)


def make_mesh(axes: Sequence[str], shape: Sequence[int]) -> Mesh:
  """A mesh over all devices with automatic (GSPMD-propagated) axis types."""
  axes = tuple(axes)
  if len(axes) != len(shape):
    raise ValueError(f"mesh.axes {axes} and mesh.shape {tuple(shape)} differ in length")
  if DATA_AXIS not in axes:
    raise ValueError(f"mesh.axes {axes} must contain the '{DATA_AXIS}' axis")
  shape = resolve_mesh_shape(shape, jax.device_count())
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  data = mesh.shape[DATA_AXIS]
  if global_batch_size <= 0:
    raise ValueError(f"global batch size must be positive, got {global_batch_size}")
  if global_batch_size % data or global_batch_size % jax.process_count():
    raise ValueError(
        f"global batch size {global_batch_size} must be divisible by the data axis size "
        f"{data} and the process count {jax.process_count()}")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles per-process numpy shards ``[B / P, ...]`` into global arrays ``[B, ...]``."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
