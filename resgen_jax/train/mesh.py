"""Device mesh and shardings.

The mesh shape is a config field: ``config.mesh.axes`` names the axes and
``config.mesh.shape`` gives their sizes, with at most one ``-1`` meaning "all remaining
devices". Three axis names mean something:

- ``data``: batches are split over it, parameters replicated (data parallelism);
- ``fsdp``: batches are split over it too, and so are the parameters and optimizer state
  (fully sharded data parallelism; XLA gathers each parameter where it is used);
- ``tensor`` (optional): parameter dimensions that ``config.mesh.rules`` map to it are
  split over it (tensor parallelism); batches are replicated over it.

The default is one ``data`` axis over every device. Which array dimension goes to which
mesh axis is decided per leaf of the training state by ``mesh.rules``: ``(regex, spec)``
pairs matched against the leaf's path (``params/block_0/attn/query/kernel``; optimizer
moments end in the same path), first match wins, ``spec`` naming a mesh axis or None for
each dimension. Leaves no rule matches are split over ``fsdp`` along their largest
dimension it divides, if they hold at least ``mesh.fsdp_min_size`` elements. An axis that is
absent from the mesh, of size 1, or does not divide the dimension is dropped from a spec, so
one set of rules serves every mesh. Activations are constrained where the model names
their logical axes (``nn.with_logical_constraint``: ``batch``, ``length``, ``embed``,
``mlp``), mapped by ``mesh.activation_rules`` while the training step is traced; GSPMD
propagates the rest. Batches are assembled as global
arrays from each process's local shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
KNOWN_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # FSDP is data parallelism with the state sharded


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


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices=None) -> Mesh:
  """A mesh over ``devices`` (default: all) with automatic (GSPMD-propagated) axis types."""
  axes = tuple(axes)
  if len(axes) != len(shape):
    raise ValueError(f"mesh.axes {axes} and mesh.shape {tuple(shape)} differ in length")
  if DATA_AXIS not in axes:
    raise ValueError(f"mesh.axes {axes} must contain the '{DATA_AXIS}' axis")
  unknown = [a for a in axes if a not in KNOWN_AXES]
  if unknown or len(set(axes)) != len(axes):
    raise ValueError(f"mesh.axes {axes} must be distinct names among {KNOWN_AXES}")
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple:
  """The mesh axes a batch's leading dimension is split over."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh: Mesh) -> int:
  """How many pieces a global batch is split into."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def example_rows(mesh: Mesh) -> int:
  """Rows per process of the smallest global batch that the batch shards and the processes
  both divide: the example batch that gives a stage's state its shapes."""
  return math.lcm(batch_shards(mesh), jax.process_count()) // jax.process_count()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data and fsdp axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """The batch splits evenly over batch shards and processes (each of its
  ``grad_accum_steps`` micro-batches too)."""
  shards = batch_shards(mesh)
  if global_batch_size <= 0:
    raise ValueError(f"global batch size must be positive, got {global_batch_size}")
  if global_batch_size % shards or global_batch_size % jax.process_count():
    raise ValueError(
        f"global batch size {global_batch_size} must be divisible by the number of batch "
        f"shards {shards} (mesh axes {batch_axes(mesh)}) and the process count "
        f"{jax.process_count()}")
  if grad_accum_steps < 1 or global_batch_size % (grad_accum_steps * shards):
    raise ValueError(
        f"train.grad_accum_steps={grad_accum_steps} must be >= 1 and split the global batch "
        f"{global_batch_size} into micro-batches that {shards} batch shards divide")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles per-process numpy shards ``[B / P, ...]`` into global arrays ``[B, ...]``."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array ``[B, ...]`` -> numpy ``[B / P,
  ...]`` in global order: the inverse of :func:`global_batch` (one copy of each row, however
  the other mesh axes replicate it)."""
  shards = sorted((s for s in array.addressable_shards if s.replica_id == 0),
                  key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


@functools.lru_cache(maxsize=None)
def _replicator(mesh: Mesh):
  return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))


def to_host(tree, mesh: Mesh):
  """Every array of ``tree`` whole, as numpy, on every process (gathering the pieces other
  hosts hold, e.g. of an FSDP-split codebook or a batch-split mask)."""
  return jax.device_get(_replicator(mesh)(tree))


def replicated_host_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global batch ``[B, ...]`` from a host array every process holds in full: global row
  ``i`` is ``array[i]`` whatever the order of processes along the mesh."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, batch_sharding(mesh), lambda i: array[i])


def _usable(axis: Optional[str], dim: int, mesh: Mesh) -> Optional[str]:
  """``axis`` if it is in the mesh, larger than 1, and divides ``dim``; else None."""
  if axis is None or axis not in mesh.axis_names:
    return None
  size = mesh.shape[axis]
  return axis if size > 1 and dim % size == 0 else None


def leaf_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence,
              fsdp_min_size: int) -> P:
  """The PartitionSpec of one state leaf (see the module docstring for the rules)."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      spec = tuple(spec)
      if len(spec) != len(shape):
        raise ValueError(f"mesh.rules entry {pattern!r} gives {len(spec)} axes {spec} for "
                         f"'{path}', which has shape {tuple(shape)}")
      return P(*(_usable(axis, dim, mesh) for axis, dim in zip(spec, shape)))
  if math.prod(shape) < fsdp_min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):  # largest first
    if _usable(FSDP_AXIS, shape[dim], mesh):
      return P(*(FSDP_AXIS if d == dim else None for d in range(len(shape))))
  return P()


def tree_paths(tree: Any) -> list:
  """``"a/b/c"`` for every leaf of ``tree``, in leaf order."""
  return [jax.tree_util.keystr(path, simple=True, separator="/")
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# Activations: the batch over data x fsdp, MLP hidden units over tensor (Megatron).
DEFAULT_ACTIVATION_RULES = (("batch", BATCH_AXES), ("length", None), ("embed", None),
                            ("mlp", TENSOR_AXIS))


def _check_axes(axes, where: str) -> None:
  unknown = [a for a in axes if a is not None and a not in KNOWN_AXES]
  if unknown:
    raise ValueError(f"{where} names mesh axes {unknown}; known axes are {KNOWN_AXES}")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """How training state and activations are laid out on a mesh: ``config.mesh.rules``,
  ``config.mesh.fsdp_min_size`` and ``config.mesh.activation_rules`` (see the module
  docstring)."""
  rules: tuple = ()
  fsdp_min_size: int = 0
  activation_rules: tuple = DEFAULT_ACTIVATION_RULES

  def __post_init__(self):
    for pattern, spec in self.rules:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"mesh.rules pattern {pattern!r} is not a regular expression: {e}")
      named = [a for a in spec if a is not None]
      _check_axes(named, f"mesh.rules entry {pattern!r}")
      if len(set(named)) != len(named):
        raise ValueError(f"mesh.rules entry {pattern!r} uses a mesh axis twice: {spec}")
    for name, axes in self.activation_rules:
      _check_axes(axes if isinstance(axes, tuple) else [axes],
                  f"mesh.activation_rules entry {name!r}")

  @classmethod
  def from_config(cls, mesh_cfg) -> "ShardingRules":
    return cls(rules=tuple((p, tuple(spec)) for p, spec in mesh_cfg.rules),
               fsdp_min_size=int(mesh_cfg.fsdp_min_size),
               activation_rules=tuple(
                   (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                   for name, axes in mesh_cfg.activation_rules))

  @contextlib.contextmanager
  def activations(self, mesh: Mesh):
    """While active, jitted functions traced inside constrain the model's logical
    activation axes as ``activation_rules`` say (mesh axes absent from ``mesh`` dropped)."""
    def present(axes):
      if isinstance(axes, tuple):
        kept = tuple(a for a in axes if a in mesh.axis_names)
        return kept or None
      return axes if axes in mesh.axis_names else None
    rules = tuple((name, present(axes)) for name, axes in self.activation_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      yield

  def shardings(self, abstract_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of ``abstract_state`` (anything with ``.shape``)."""
    leaves, treedef = jax.tree.flatten(abstract_state)
    specs = [leaf_spec(path, leaf.shape, mesh, self.rules, self.fsdp_min_size)
             for path, leaf in zip(tree_paths(abstract_state), leaves)]
    return jax.tree.unflatten(treedef, [NamedSharding(mesh, spec) for spec in specs])
