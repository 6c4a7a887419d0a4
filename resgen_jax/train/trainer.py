"""The one training loop every stage shares.

``train_and_evaluate`` runs a :class:`~resgen_jax.train.task.Task` for ``train.num_steps``
steps: jit over a device mesh (parameters replicated, batch sharded over ``data``), an optax
chain from the config, optional EMA of the parameters for evaluation, orbax checkpoints
(periodic async saves, keep-N, automatic resume including the data iterator position, a
save on SIGTERM), per-step RNG by folding the step into the seed, and a stop with an error
naming the step on a non-finite loss (the update of that step is never applied, so the last
checkpoint stays good).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import parameter_overview, periodic_actions

from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import optim, preemption, profiling, writers
from resgen_jax.train.task import Task

PyTree = Any
CHECKPOINT_DIR = "checkpoints"
NO_NONFINITE_STEP = -1  # TrainState.nonfinite_step while every loss so far was finite.


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: trained parameters.
    opt_state: optax state.
    model_state: the task's non-gradient state (e.g. EMA codebooks).
    ema_params: EMA of ``params`` (``{}`` when disabled), used for evaluation and sampling.
    nonfinite_step: first step whose loss or gradient was not finite, or -1.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree
  ema_params: PyTree
  nonfinite_step: jax.Array

  def eval_params(self) -> PyTree:
    """The parameters to evaluate and sample with: the EMA when it is kept."""
    return self.ema_params if self.ema_params else self.params


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  finished: bool  # reached train.num_steps (now or in an earlier run)
  preempted: bool  # stopped early by SIGTERM after saving


def stage_key(seed: int, stage: str) -> jax.Array:
  """The root key of a stage: the run seed with a stable hash of the stage name folded in,
  so stages draw independent streams that do not change between processes or runs."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(stage.encode()) & 0x7FFFFFFF)


def step_rng(seed_key: jax.Array, step) -> jax.Array:
  """The RNG of one step: the seed with the step folded in, so a resumed run continues the
  same stream."""
  return jax.random.fold_in(seed_key, step)


def _init_state_fn(task: Task, optimizer: optax.GradientTransformation, ema: bool) -> Callable:
  """``(rng, batch) -> TrainState`` at step 0."""

  def init(rng, batch):
    params, model_state = task.init(rng, batch)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), model_state=model_state,
                      ema_params=jax.tree.map(jnp.copy, params) if ema else {},
                      nonfinite_step=jnp.full((), NO_NONFINITE_STEP, jnp.int32))

  return init


def state_layout(task: Task, optimizer: optax.GradientTransformation, rng: jax.Array,
                 batch: dict, ema: bool, mesh, rules: mesh_lib.ShardingRules):
  """``(abstract_state, shardings)``: shapes, dtypes and shardings of the state without
  allocating it (for creating it in place and for restoring onto any mesh)."""
  shapes = jax.eval_shape(_init_state_fn(task, optimizer, ema), rng, batch)
  shardings = rules.shardings(shapes, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return abstract, shardings


def create_train_state(task: Task, optimizer: optax.GradientTransformation, rng: jax.Array,
                       batch: dict, ema: bool, shardings) -> TrainState:
  """Initialises the state directly with ``shardings`` (a tree, or one sharding for every
  leaf): each device computes only its shards, with no full copy on one device first."""
  return jax.jit(_init_state_fn(task, optimizer, ema), out_shardings=shardings)(rng, batch)


def inference_layout(task: Task, abstract_state: TrainState) -> TrainState:
  """What evaluating, encoding or sampling needs of a state: no optimizer state
  (``opt_state=None``) and no :attr:`Task.training_only_params`."""
  keep = lambda p: {k: v for k, v in p.items() if k not in task.training_only_params}
  return abstract_state.replace(opt_state=None, params=keep(abstract_state.params),
                                ema_params=keep(abstract_state.ema_params))


def load_trained_state(task: Task, cfg: ml_collections.ConfigDict, workdir: str,
                       batch: dict, mesh, seed: int,
                       rules: mesh_lib.ShardingRules = mesh_lib.ShardingRules()) -> TrainState:
  """The latest checkpoint of a trained stage, for evaluation, encoding or sampling, laid
  out on ``mesh`` by ``rules`` whatever mesh it was saved from. Only what inference needs
  is read (:func:`inference_layout`): ``opt_state`` is None and the training-only
  parameters are absent, so a run trained on a pod loads on one device.

  Args:
    batch: an example global batch (for shapes).
  """
  stage_dir = os.path.join(workdir, task.name)
  manager = checkpoint_manager(stage_dir, cfg)
  try:
    latest = manager.latest_step()
    if latest is None:
      raise FileNotFoundError(
          f"no checkpoint of the '{task.name}' stage in {manager.directory}; train it first")
    init_key = jax.random.split(stage_key(seed, task.name), 3)[0]
    abstract, _ = state_layout(task, optim.make_optimizer(cfg), init_key, batch,
                               cfg.ema_decay > 0, mesh, rules)
    state, _, _ = restore_good_state(manager, inference_layout(task, abstract), partial=True)
  finally:
    manager.close()
  return state


def ema_warmup_decay(decay: float, step) -> jax.Array:
  """The parameter-EMA decay at ``step``: ``min(decay, (1 + step) / (10 + step))``, so the
  average forgets the random initialisation quickly and short runs get a useful EMA."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def micro_batches(batch: dict, k: int) -> dict:
  """``[B, ...] -> [k, B / k, ...]``, micro-batch ``i`` holding examples ``i, i + k, ...``:
  every device keeps the rows it already has, so no data moves between devices."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} does not split into {k} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulated_loss_and_grads(task: Task, params, model_state, constants, batch: dict,
                               rng: jax.Array, step, k: int):
  """``task.loss_and_grads`` over ``k`` micro-batches, one after another (``lax.scan``).

  Loss, gradients and metrics are the means over micro-batches (the full-batch values for
  losses that are means over examples; a loss normalised by a per-batch count, such as the
  generator's per-hidden-token mean, is close to it but not equal); the model state threads
  through them in order, so a task whose model state holds per-batch statistics (the
  tokenizer's EMA codebooks) must not use k > 1; micro-batch ``i`` draws from
  ``fold_in(rng, i)``. ``k = 1`` is the plain call.
  """
  if k == 1:
    return task.loss_and_grads(params, model_state, constants, batch, rng, step)

  def one(carry, inputs):
    model_state, grad_sum = carry
    index, micro = inputs
    loss, grads, model_state, metrics = task.loss_and_grads(
        params, model_state, constants, micro, jax.random.fold_in(rng, index), step)
    return (model_state, jax.tree.map(jnp.add, grad_sum, grads)), (loss, metrics)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (model_state, grad_sum), (losses, metrics) = jax.lax.scan(
      one, (model_state, zeros), (jnp.arange(k), micro_batches(batch, k)))
  mean = lambda x: jnp.mean(x, axis=0)
  return (mean(losses), jax.tree.map(lambda g: g / k, grad_sum), model_state,
          jax.tree.map(mean, metrics))


def make_train_step(task: Task, optimizer: optax.GradientTransformation,
                    lr_fn: Callable, ema_decay: float, grad_accum_steps: int = 1) -> Callable:
  """Returns ``train_step(state, constants, batch, seed_key) -> (state, metrics)``; the
  gradient is accumulated over ``grad_accum_steps`` micro-batches."""

  def train_step(state: TrainState, constants, batch, seed_key):
    rng = step_rng(seed_key, state.step)
    loss, grads, model_state, metrics = accumulated_loss_and_grads(
        task, state.params, state.model_state, constants, batch, rng, state.step,
        grad_accum_steps)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_warmup_decay(ema_decay, state.step)
    ema_params = (jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                               state.ema_params, params) if state.ema_params else {})
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        model_state=model_state, ema_params=ema_params)
    # A non-finite step is never applied: the state stays as it was and the step is noted.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    # Steps are numbered as logged: the update that completes step n is step n.
    first_bad = jnp.where((state.nonfinite_step < 0) & ~finite, state.step + 1,
                          state.nonfinite_step)
    new = new.replace(step=state.step + 1, nonfinite_step=first_bad)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=lr_fn(state.step))
    return new, metrics

  return train_step


EVAL_STEP_ATTR = "_eval_step_fn"  # where make_eval_step keeps a task's eval step


def make_eval_step(task: Task) -> Callable:
  """``(state, constants, batch) -> metric sums``; the same function for the same task
  (kept on it, so it goes with it), so every jit of it (periodic evaluations, the stage's
  final report) shares one compilation."""
  cached = vars(task)
  if EVAL_STEP_ATTR not in cached:
    cached[EVAL_STEP_ATTR] = lambda state, constants, batch: task.eval_step(
        state.eval_params(), state.model_state, constants, batch)
  return cached[EVAL_STEP_ATTR]


def evaluate(eval_step: Callable, state: TrainState, constants, batches: Iterable[dict],
             mesh) -> dict:
  """Averages the task's per-batch metric sums over ``batches`` (dicts of local shards).
  Raises :class:`preemption.Preempted` between batches once a SIGTERM has arrived."""
  totals = None
  for local in preemption.checked(batches):
    sums = eval_step(state, constants, mesh_lib.global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("the evaluation split yielded no batches")
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  return {k: float(v) / count for k, v in totals.items()}


METADATA_FILE = "_METADATA"  # orbax's array metadata of a checkpoint item


class CheckpointMismatchError(ValueError):
  """A checkpoint written by another config: an error to report, not damage to skip."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint save that failed (in orbax's background thread when async)."""


def latest_checkpoint_step(stage_dir: str) -> Optional[int]:
  """The step of the newest finished checkpoint of a stage (orbax names each by its step;
  saves in progress carry a suffix), or None; reads the folder only, restores nothing."""
  directory = os.path.join(stage_dir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
  return max(steps) if steps else None


def checkpoint_manager(stage_dir: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """The stage's manager. The item handlers are named so that a checkpoint's metadata can
  be read (to check it against the config) before anything is restored. Close it."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=cfg.async_checkpoints,
      create=True)
  return ocp.CheckpointManager(
      os.path.join(stage_dir, CHECKPOINT_DIR), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler()})


def _leaf_specs(tree: PyTree) -> dict:
  """``{"params/encoder/kernel": (shape, dtype)}`` for every array leaf of ``tree``."""
  return {path: (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in zip(mesh_lib.tree_paths(tree), jax.tree.leaves(tree))}


def checkpoint_mismatch(saved: PyTree, abstract_state: TrainState,
                        partial: bool = False) -> Optional[str]:
  """How a checkpoint's array metadata differs from the state the config builds, or None.

  Args:
    saved: the checkpoint's tree of array metadata (anything with ``shape`` and ``dtype``).
    abstract_state: the state the current config builds (``ShapeDtypeStruct`` leaves).
    partial: ``abstract_state`` is a part of the state (:func:`inference_layout`): arrays
      of the checkpoint that it does not hold are not a difference.
  """
  have, want = _leaf_specs(saved), _leaf_specs(abstract_state)
  missing = sorted(want.keys() - have.keys())
  extra = [] if partial else sorted(have.keys() - want.keys())
  if missing or extra:
    return (f"arrays this config builds but the checkpoint lacks: {missing[:5]}; arrays "
            f"the checkpoint has but this config does not build: {extra[:5]}")
  for name in sorted(want):
    if have[name] != want[name]:
      return (f"'{name}' is {have[name][0]} {have[name][1]} in the checkpoint but "
              f"{want[name][0]} {want[name][1]} in this config")
  return None


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState,
                  partial: bool = False):
  """Restores ``(state, data_state)`` at ``step`` onto the shardings of ``abstract_state``.

  The checkpoint's metadata is compared with ``abstract_state`` first: a checkpoint from
  another config (other shapes, dtypes or structure) is a ValueError naming the checkpoint
  and the first difference, and nothing is read. With ``partial`` only the arrays of
  ``abstract_state`` (a part of the saved state, see :func:`inference_layout`) are read,
  and ``data_state`` is None.
  """
  try:
    metadata = manager.item_metadata(step)["state"].tree
  except ValueError as e:  # JSONDecodeError included: a truncated or damaged file
    path = os.path.join(str(manager.directory), str(step), "state", METADATA_FILE)
    raise ValueError(f"the checkpoint's metadata file {path} is damaged "
                     f"({type(e).__name__}: {e})") from e
  mismatch = checkpoint_mismatch(metadata, abstract_state, partial)
  if mismatch:
    raise CheckpointMismatchError(
        f"the checkpoint {manager.directory}/{step} does not match the model this config "
        f"builds (was it written by another config?): {mismatch}")
  if partial:
    # The saved tree is the state's fields as a dict; the template holds the ones kept.
    path = os.path.join(str(manager.directory), str(step), "state")
    template = {f.name: getattr(abstract_state, f.name)
                for f in dataclasses.fields(abstract_state)
                if getattr(abstract_state, f.name) is not None}
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=template, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(template)))
    return abstract_state.replace(**restored), None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def all_finite(tree: PyTree) -> bool:
  """Whether every floating-point leaf of ``tree`` is finite (a restored state whose bytes
  were damaged can load without an error but hold NaN or inf)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def restore_good_state(manager: ocp.CheckpointManager, abstract_state: TrainState,
                       set_aside: bool = False, partial: bool = False):
  """The newest checkpoint that reads back whole and finite: ``(state, data_state, step)``.
  An unreadable or non-finite one is skipped with a warning naming it and the step used
  instead; with ``set_aside`` (training, which will save again) it is renamed to
  ``<step>.unreadable`` so its step can be written anew, never deleted. A checkpoint of
  another config (a shape mismatch) is an error, not damage. ``partial``: see
  :func:`restore_state`."""
  steps = sorted(manager.all_steps(), reverse=True)
  bad = []
  for step in steps:
    try:
      state, data_state = restore_state(manager, step, abstract_state, partial)
      problem = None if all_finite(state) else "holds non-finite values"
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # TensorStore, JSON, OS errors
      problem = f"cannot be read ({type(e).__name__}: {e})"
    if problem is None:
      if bad:
        logging.warning("%s: using checkpoint step %d instead of the newest, step %d",
                        manager.directory, step, bad[0])
      return state, data_state, step
    logging.warning("checkpoint %s/%d %s", manager.directory, step, problem)
    bad.append(step)
    if set_aside and jax.process_index() == 0:
      path = os.path.join(str(manager.directory), str(step))
      os.replace(path, path + ".unreadable")
  raise RuntimeError(f"no checkpoint in {manager.directory} reads back whole and finite "
                     f"(steps tried: {bad}); see the warnings above for each")


def save_state(manager: ocp.CheckpointManager, state: TrainState, data_state: dict) -> None:
  """Saves a finite ``state`` at its step (a non-finite one stops the run: see
  :func:`check_finite`); a failed save is a :class:`CheckpointSaveError`."""
  check_finite(state, manager)
  with save_errors(manager, int(state.step)):  # an async save first waits for the last one
    manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))


@contextlib.contextmanager
def save_errors(manager: ocp.CheckpointManager, step: int):
  """Turns an error of a checkpoint save (raised in ``with``; for async saves, the error
  of an earlier save, surfaced by waiting or checking) into :class:`CheckpointSaveError`
  naming the newest complete checkpoint; the failed save's temporary folder is orbax's to
  clean up on the next start."""
  try:
    yield
  except CheckpointSaveError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # whatever the writer raised
    done = latest_checkpoint_step(os.path.dirname(str(manager.directory)))
    raise CheckpointSaveError(
        f"saving a checkpoint in {manager.directory} failed ({type(e).__name__}: {e}); "
        f"the run stopped at step {step}; the newest complete checkpoint is step {done}, "
        f"and a rerun resumes from it") from e


def check_saves(manager: ocp.CheckpointManager, step: int) -> None:
  """Raises :class:`CheckpointSaveError` at once if a background save has failed (disk
  full, a write limit), instead of training on and losing the progress since."""
  with save_errors(manager, step):
    manager.check_for_errors()
    if not manager.is_saving_in_progress():  # a finished save: returns, or raises its error
      manager.wait_until_finished()


def check_finite(state: TrainState, manager: ocp.CheckpointManager) -> None:
  bad = int(state.nonfinite_step)
  if bad != NO_NONFINITE_STEP:
    manager.wait_until_finished()
    raise FloatingPointError(
        f"non-finite loss or gradient at step {bad}; the run stopped and the last good "
        f"checkpoint (step {manager.latest_step()}) in {manager.directory} is kept")


@jax.jit
def _mean_metrics(history: list) -> dict:
  """Means over a logging interval, computed on device: one transfer instead of one per
  metric and step."""
  return jax.tree.map(lambda *values: jnp.mean(jnp.stack(values)), *history)


def train_and_evaluate(task: Task, cfg: ml_collections.ConfigDict, workdir: str,
                       train_iter: Iterator[dict], eval_batches: Callable[[], Iterable[dict]],
                       mesh, seed: int,
                       rules: mesh_lib.ShardingRules = mesh_lib.ShardingRules(),
                       hooks: Sequence[Tuple[int, Callable[[TrainState], dict]]] = ()
                       ) -> TrainResult:
  """Trains ``task`` as ``cfg`` (a ``train`` config) says, resuming from ``workdir/<stage>``.

  Args:
    task: the stage.
    cfg: optimizer, step counts, intervals and checkpoint options.
    workdir: the run directory (``metrics.jsonl`` lives here).
    train_iter: local batches (dicts of numpy arrays) with ``get_state`` / ``set_state``.
    eval_batches: returns a fresh pass over the evaluation split (local batches with a
      ``valid`` mask).
    mesh: the device mesh.
    seed: the run's seed.
    rules: how the state is laid out on ``mesh`` (default: replicated, or split over an
      ``fsdp`` axis); a checkpoint saved with any layout resumes with this one.
    hooks: ``(every, fn)`` pairs: every ``every`` steps and at the end, ``fn(state)``
      returns scalars logged beside the train metrics as ``train/<name>`` (e.g. the
      generator's ``fid_proxy``). Every process calls them.

  Returns:
    :class:`TrainResult`.
  """
  stage_dir = os.path.join(workdir, task.name)
  os.makedirs(stage_dir, exist_ok=True)
  manager = checkpoint_manager(stage_dir, cfg)
  try:
    result = _train_with_manager(task, cfg, workdir, stage_dir, manager, train_iter,
                                 eval_batches, mesh, seed, rules, hooks)
  except BaseException:
    # Pending saves land and orbax's threads stop; a second error from them (the same
    # failed save) must not hide the one that stopped the run.
    try:
      manager.close()
    except Exception:  # pylint: disable=broad-except
      logging.exception("%s: closing the checkpoint manager failed too", task.name)
    raise
  with save_errors(manager, int(result.state.step)):  # the last save, when async, too
    manager.wait_until_finished()
    manager.check_for_errors()
  manager.close()
  return result


def _train_with_manager(task: Task, cfg: ml_collections.ConfigDict, workdir: str,
                        stage_dir: str, manager: ocp.CheckpointManager,
                        train_iter: Iterator[dict],
                        eval_batches: Callable[[], Iterable[dict]], mesh, seed: int,
                        rules: mesh_lib.ShardingRules, hooks) -> TrainResult:
  """The body of :func:`train_and_evaluate`; the caller owns (and closes) ``manager``."""
  optimizer = optim.make_optimizer(cfg)
  lr_fn = optim.learning_rate_schedule(cfg)
  ema = cfg.ema_decay > 0
  constants = task.constants()
  init_key, data_init_key, step_key = jax.random.split(stage_key(seed, task.name), 3)

  latest = manager.latest_step()
  position = train_iter.get_state()
  example = mesh_lib.global_batch(next(train_iter), mesh)  # the first batch, for shapes
  train_iter.set_state(position)
  abstract, shardings = state_layout(task, optimizer, init_key, example, ema, mesh, rules)
  logging.info("%s parameters:\n%s", task.name, parameter_overview.get_parameter_overview(
      abstract.params, include_stats=False))
  if latest is None:
    state = create_train_state(task, optimizer, init_key, example, ema, shardings)
    state = state.replace(model_state=jax.jit(
        task.data_init, out_shardings=shardings.model_state)(
            state.params, state.model_state, example, data_init_key))
    logging.info("%s: starting a new run in %s", task.name, stage_dir)
  else:
    state, data_state, latest = restore_good_state(manager, abstract, set_aside=True)
    manager.reload()  # steps set aside are no longer the manager's
    train_iter.set_state(data_state)
    logging.info("%s: resumed from step %d in %s", task.name, latest, stage_dir)

  start = int(state.step)
  if start >= cfg.num_steps:
    logging.info("%s: already finished (step %d >= %d); nothing to train", task.name, start,
                 cfg.num_steps)
    return TrainResult(state=state, finished=True, preempted=False)
  writer = writers.create_writer(workdir, stage_dir, task.name,
                                 resume_step=start if latest is not None else 0)

  # The state keeps its layout from step to step (and its buffers are reused in place).
  train_step = jax.jit(make_train_step(task, optimizer, lr_fn, cfg.ema_decay,
                                       cfg.grad_accum_steps),
                       donate_argnums=(0,),
                       out_shardings=(shardings, mesh_lib.replicated(mesh)))
  eval_step = jax.jit(make_eval_step(task))
  # Progress (steps/s, ETA) goes to the log; steps/s also joins each train metrics row.
  progress = periodic_actions.ReportProgress(num_train_steps=cfg.num_steps,
                                             every_steps=cfg.log_every)
  history, preempted = [], False
  interval_start, interval_step = time.time(), start
  profiler = profiling.StepProfiler(profiling.profile_dir(stage_dir), start,
                                    cfg.profile_steps)
  # closing the writer flushes the event file; closing the profiler writes an open trace
  with preemption.watch(), contextlib.closing(writer), contextlib.closing(profiler):
    for step in range(start, cfg.num_steps):
      check_saves(manager, step)  # a failed background save stops the run at once
      batch = mesh_lib.global_batch(next(train_iter), mesh)
      with profiler.step(step), rules.activations(mesh):  # activation layout: at tracing
        state, metrics = train_step(state, constants, batch, step_key)
      profiler.finish(step, (state, metrics))
      history.append(metrics)
      done = step + 1
      progress(done)
      if done % cfg.log_every == 0 or done == cfg.num_steps:
        check_finite(state, manager)
        means = jax.device_get(_mean_metrics(history))
        now = time.time()
        means["steps_per_sec"] = (done - interval_step) / max(now - interval_start, 1e-9)
        writer.write_scalars(done, {f"train/{k}": float(v) for k, v in means.items()})
        history, interval_start, interval_step = [], now, done
      try:  # a SIGTERM during these passes stops them at the next batch
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.num_steps:
          with rules.activations(mesh):
            result = evaluate(eval_step, state, constants, eval_batches(), mesh)
          writer.write_scalars(done, {f"eval/{k}": v for k, v in result.items()})
        for every, hook in hooks:
          if done % every == 0 or done == cfg.num_steps:
            writer.write_scalars(done, {f"train/{k}": float(v)
                                        for k, v in hook(state).items()})
        preempted = manager.reached_preemption(done) or preemption.requested()
      except preemption.Preempted:
        preempted = True
      if done % cfg.checkpoint_every == 0 or done == cfg.num_steps or preempted:
        save_state(manager, state, train_iter.get_state())
      if preempted:
        logging.warning("%s: preempted at step %d; checkpoint saved", task.name, done)
        break
  return TrainResult(state=state, finished=not preempted, preempted=preempted)

