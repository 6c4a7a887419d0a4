"""The shared trainer on a toy task: resume, non-finite stop, preemption, metrics files."""

import glob
import gzip
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resgen_jax import config_base
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import optim, preemption, trainer
from resgen_jax.train.task import Task

DIM = 3
BATCH = 8


class LinearTask(Task):
  """Least squares ``y = x @ w``; model_state counts the examples seen (checkpointed)."""
  name = "linear"

  def init(self, rng, batch):
    return {"w": jax.random.normal(rng, (DIM,))}, {"seen": jnp.zeros((), jnp.float32)}

  def loss_and_grads(self, params, model_state, constants, batch, rng, step):
    def loss_fn(p):
      noise = 0.01 * jax.random.normal(rng, batch["y"].shape)  # uses the per-step RNG
      return jnp.mean((batch["x"] @ p["w"] - batch["y"] + noise) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    loss = loss * batch["scale"][0]  # scale = nan poisons a step
    seen = model_state["seen"] + batch["x"].shape[0]
    return loss, grads, {"seen": seen}, {"mse": loss}

  def eval_step(self, params, model_state, constants, batch):
    err = jnp.sum((batch["x"] @ params["w"] - batch["y"]) ** 2, -1)
    valid = batch["valid"].astype(jnp.float32)
    return {"sq_err": jnp.sum(err * valid), "count": jnp.sum(valid)}


class ToyIterator:
  """Deterministic batches indexed by position; ``poison_at`` makes that batch NaN;
  ``on_batch`` is called with each batch index drawn."""

  def __init__(self, poison_at=None, on_batch=None):
    self.n, self.poison_at, self.on_batch = 0, poison_at, on_batch

  def __next__(self):
    rng = np.random.default_rng(self.n)
    x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    scale = np.full((BATCH,), np.nan if self.n == self.poison_at else 1.0, np.float32)
    if self.on_batch:
      self.on_batch(self.n)
    self.n += 1
    return {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32), "scale": scale}

  def get_state(self):
    return {"batches": self.n}

  def set_state(self, state):
    self.n = state["batches"]


def eval_batches():
  rng = np.random.default_rng(1234)
  x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
  return [{"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32),
           "scale": np.ones((BATCH,), np.float32), "valid": np.ones((BATCH,), bool)}]


def train_cfg(**kw):
  base = dict(num_steps=6, warmup_steps=1, learning_rate=0.1, log_every=2, eval_every=3,
              checkpoint_every=3, async_checkpoints=True, ema_decay=0.5)
  base.update(kw)
  return config_base.train_config(**base)


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh(("data",), (-1,))


def run(workdir, mesh, cfg=None, it=None):
  return trainer.train_and_evaluate(LinearTask(), cfg or train_cfg(), str(workdir),
                                    it or ToyIterator(), eval_batches, mesh, seed=0)


def assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_preempted_then_resumed_equals_uninterrupted(tmp_path, mesh):
  full = run(tmp_path / "full", mesh)
  assert full.finished and int(full.state.step) == 6

  # SIGTERM arrives while step 2 (0-based batch 1) runs: the trainer saves after that step.
  it = ToyIterator(on_batch=lambda n: n == 1 and os.kill(os.getpid(), signal.SIGTERM))
  cut = run(tmp_path / "cut", mesh, it=it)
  assert cut.preempted and int(cut.state.step) == 2
  resumed = run(tmp_path / "cut", mesh)
  assert resumed.finished and int(resumed.state.step) == 6
  assert_same_state(full.state, resumed.state)
  assert float(resumed.state.model_state["seen"]) == 6 * BATCH

  # A finished run is not trained again and its checkpoints are untouched.
  ckpt_dir = tmp_path / "full" / "linear" / trainer.CHECKPOINT_DIR
  before = sorted(os.listdir(ckpt_dir))
  again = run(tmp_path / "full", mesh)
  assert again.finished and int(again.state.step) == 6
  assert sorted(os.listdir(ckpt_dir)) == before
  assert_same_state(full.state, again.state)


SLOW_EVAL_BATCHES = 40  # a pass far longer than a grace period if it ran to the end


@pytest.mark.parametrize("where", ["evaluation", "hook"])
def test_sigterm_during_a_slow_pass_saves_at_the_next_batch(tmp_path, mesh, where):
  """SIGTERM arriving in the middle of the step-3 evaluation pass (or of a hook's loop,
  like the FID proxy's sampling) stops that pass at its next batch, not at its end: the
  step-3 state is saved at once and the run exits preempted; resuming then ends exactly
  where an uninterrupted run ends."""
  drawn, armed = [], []

  def slow_batches():
    for n in range(SLOW_EVAL_BATCHES):
      drawn.append(n)
      if n == 2 and armed:
        os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)
      yield eval_batches()[0]

  def hook(state):
    del state
    return {"passes": float(sum(1 for _ in preemption.checked(slow_batches())))}

  def go(workdir):
    kwargs = dict(hooks=((3, hook),)) if where == "hook" else {}
    evals = slow_batches if where == "evaluation" else eval_batches
    return trainer.train_and_evaluate(LinearTask(), train_cfg(), str(workdir), ToyIterator(),
                                      evals, mesh, seed=0, **kwargs)

  full = go(tmp_path / "full")
  armed.append(True)
  drawn.clear()
  cut = go(tmp_path / "cut")
  armed.clear()
  assert cut.preempted and int(cut.state.step) == 3
  assert drawn == [0, 1, 2]  # the batch after the signal was never drawn
  assert trainer.latest_checkpoint_step(str(tmp_path / "cut" / "linear")) == 3
  resumed = go(tmp_path / "cut")
  assert resumed.finished and int(resumed.state.step) == 6
  assert_same_state(full.state, resumed.state)


@pytest.mark.parametrize("damaged", ["chunks", "metadata"])
def test_resume_past_a_damaged_checkpoint_sets_it_aside_and_ends_the_same(tmp_path, mesh,
                                                                          caplog, damaged):
  """The newest checkpoint's chunks (or its array metadata file) truncated: the run resumes
  from the one before (a warning names both, and the damaged file), keeps the damaged one
  as <step>.unreadable, and ends where an uninterrupted run ends."""
  cfg = train_cfg(checkpoint_every=2)
  full = run(tmp_path / "full", mesh, cfg=cfg)
  it = ToyIterator(on_batch=lambda n: n == 3 and os.kill(os.getpid(), signal.SIGTERM))
  assert run(tmp_path / "cut", mesh, cfg=cfg, it=it).preempted
  ckpt_dir = tmp_path / "cut" / "linear" / trainer.CHECKPOINT_DIR
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]
  for directory, _, names in os.walk(ckpt_dir / "4"):
    for name in names:
      if (os.path.basename(directory) == "d" if damaged == "chunks"
          else name == trainer.METADATA_FILE):
        path = os.path.join(directory, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level("WARNING"):
    resumed = run(tmp_path / "cut", mesh, cfg=cfg)
  assert "/4 cannot be read" in caplog.text
  if damaged == "metadata":
    assert f"metadata file {ckpt_dir}/4/state/{trainer.METADATA_FILE} is damaged" \
        in caplog.text
  assert "using checkpoint step 2 instead of the newest, step 4" in caplog.text
  assert resumed.finished and int(resumed.state.step) == 6
  assert_same_state(full.state, resumed.state)
  assert "4.unreadable" in os.listdir(ckpt_dir)


def test_metrics_jsonl_rows_and_no_duplicates_after_resume(tmp_path, mesh, caplog):
  it = ToyIterator(on_batch=lambda n: n == 3 and os.kill(os.getpid(), signal.SIGTERM))
  run(tmp_path, mesh, cfg=train_cfg(checkpoint_every=100), it=it)  # saved at 4 by SIGTERM
  with caplog.at_level("INFO"):
    run(tmp_path, mesh, cfg=train_cfg(checkpoint_every=100))
  # Each stage logs its parameter overview (name, shape, size, total) when it starts.
  assert "linear parameters:" in caplog.text
  assert f"| w    | ({DIM},)  | float32 | {DIM}    |" in caplog.text
  assert f"Total: {DIM} -- {4 * DIM} bytes" in caplog.text
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_rows = [r["step"] for r in rows if "train/loss" in r]
  assert train_rows == [2, 4, 6]
  assert [r["step"] for r in rows if "eval/sq_err" in r] == [3, 6]
  assert all(r["stage"] == "linear" for r in rows)
  assert all(np.isfinite(r["train/loss"]) and "train/learning_rate" in r
             for r in rows if "train/loss" in r)
  # TensorBoard event files are written too.
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "linear"))


def test_nonfinite_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path, mesh):
  cfg = train_cfg(checkpoint_every=2, log_every=100, eval_every=0)
  with pytest.raises(FloatingPointError, match="step 4.*last good checkpoint \\(step 2\\)"):
    run(tmp_path, mesh, cfg=cfg, it=ToyIterator(poison_at=3))
  manager = trainer.checkpoint_manager(str(tmp_path / "linear"), cfg)
  assert manager.latest_step() == 2
  manager.close()


def test_a_failed_background_save_stops_the_run_at_the_next_step(tmp_path, mesh,
                                                                 monkeypatch):
  """The async save at step 4 fails in orbax's thread (a write limit): the run stops with
  one CheckpointSaveError at the next step instead of training on, and a rerun resumes
  from step 2 and ends where an uninterrupted run ends."""
  import threading
  import orbax.checkpoint as ocp
  cfg = train_cfg(checkpoint_every=2, num_steps=8)
  full = run(tmp_path / "full", mesh, cfg=cfg)
  failed = threading.Event()
  write = ocp.JsonCheckpointHandler._save_fn

  async def write_limited(self, item, directory):
    if f"{os.sep}4." in str(directory):
      try:
        raise OSError(27, "File too large", str(directory))
      finally:
        failed.set()
    return await write(self, item, directory)

  def after_failure(n):  # step 5's batch: the failed save has finished failing
    if n == 4:
      assert failed.wait(30)
      for thread in threading.enumerate():  # polled: orbax's join re-raises the error
        while "save_finalize" in thread.name and thread.is_alive():
          time.sleep(0.01)

  drawn = []
  it = ToyIterator(on_batch=lambda n: (drawn.append(n), after_failure(n)))
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", write_limited)
  with pytest.raises(trainer.CheckpointSaveError,
                     match="File too large.*stopped at step 5.*newest complete checkpoint "
                           "is step 2"):
    run(tmp_path / "cut", mesh, cfg=cfg, it=it)
  assert max(drawn) == 4  # nothing trained past the step after the failure
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", write)
  resumed = run(tmp_path / "cut", mesh, cfg=cfg)
  assert resumed.finished and int(resumed.state.step) == 8
  assert_same_state(full.state, resumed.state)


def test_restoring_a_checkpoint_of_another_model_is_a_clear_error(tmp_path, mesh):
  run(tmp_path, mesh, cfg=train_cfg(num_steps=3))

  class WiderTask(LinearTask):
    def init(self, rng, batch):
      return {"w": jnp.zeros((DIM + 1,))}, {"seen": jnp.zeros(())}

  with pytest.raises(ValueError, match="does not match the model this config builds") as e:
    trainer.train_and_evaluate(WiderTask(), train_cfg(), str(tmp_path), ToyIterator(),
                               eval_batches, mesh, seed=0)
  # The message names the first array that differs, with both shapes.
  assert f"/w' is ({DIM},) float32 in the checkpoint but ({DIM + 1},) float32" in str(e.value)
  run(tmp_path, mesh, cfg=train_cfg(num_steps=4))  # the rejected restore left it intact


def test_checkpoint_mismatch_names_missing_extra_and_reshaped_arrays():
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  want = {"a": spec(2, 3), "b": {"c": spec(4)}}
  assert trainer.checkpoint_mismatch({"a": spec(2, 3), "b": {"c": spec(4)}}, want) is None
  assert "lacks: ['b/c']" in trainer.checkpoint_mismatch({"a": spec(2, 3)}, want)
  extra = trainer.checkpoint_mismatch({"a": spec(2, 3), "b": {"c": spec(4)}, "d": spec(1)},
                                      want)
  assert "does not build: ['d']" in extra
  assert "'a' is (3, 2) float32 in the checkpoint but (2, 3)" in trainer.checkpoint_mismatch(
      {"a": spec(3, 2), "b": {"c": spec(4)}}, want)
  halves = {"a": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16), "b": {"c": spec(4)}}
  assert "bfloat16 in the checkpoint" in trainer.checkpoint_mismatch(halves, want)


def test_step_rng_is_a_function_of_seed_and_step():
  key = trainer.stage_key(0, "linear")
  a, b = trainer.step_rng(key, 5), trainer.step_rng(key, 5)
  assert (jax.random.key_data(a) == jax.random.key_data(b)).all()
  assert not (jax.random.key_data(a) == jax.random.key_data(trainer.step_rng(key, 6))).all()
  other = trainer.stage_key(0, "tokenizer")
  assert not (jax.random.key_data(key) == jax.random.key_data(other)).all()


def test_eval_every_zero_evaluates_once_at_the_end(tmp_path, mesh):
  run(tmp_path, mesh, cfg=train_cfg(eval_every=0))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "eval/sq_err" in r] == [6]


def test_weight_decay_reaches_weights_and_embeddings_only():
  cfg = train_cfg(weight_decay=0.5, grad_clip=0.0, learning_rate=0.1, warmup_steps=1)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "log_sigma": jnp.ones(()),
            "attn": {"bias": jnp.ones((2, 4))},  # [heads, head]: a bias despite its rank
            "blocks": {"scale": jnp.ones((3, 2)), "kernel": jnp.ones((3, 2, 2))},  # scanned
            "pos_embedding": jnp.ones((4, 2))}
  opt = optim.make_optimizer(cfg)
  state = opt.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):  # step 0 has learning rate 0 (warmup)
    updates, state = opt.update(zero, state, params)
    params = optax.apply_updates(params, updates)
  decayed = {"kernel", "blocks/kernel", "pos_embedding"}
  for path, value in zip(mesh_lib.tree_paths(params), jax.tree.leaves(params)):
    assert (np.asarray(value) < 1.0).all() if path in decayed else (value == 1.0).all(), path


class MeanSquaresTask(LinearTask):
  """Deterministic least squares (no RNG, no poison): micro-batch means average exactly to
  the full-batch mean."""

  def loss_and_grads(self, params, model_state, constants, batch, rng, step):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2))(params)
    seen = model_state["seen"] + batch["x"].shape[0]
    return loss, grads, {"seen": seen}, {"mse": loss}


def test_micro_batches_are_strided_rows():
  batch = {"x": np.arange(24).reshape(12, 2)}
  micro = trainer.micro_batches(batch, 3)["x"]
  for i in range(3):
    np.testing.assert_array_equal(micro[i], batch["x"][i::3])
  with pytest.raises(ValueError, match="does not split into 5"):
    trainer.micro_batches(batch, 5)


def test_gradient_accumulation_gives_the_full_batch_update(mesh):
  task = MeanSquaresTask()
  optimizer = optax.adamw(0.1, eps=1e-3)
  local = next(ToyIterator())
  local = {k: np.concatenate([v] * 4) for k, v in local.items()}  # 32 rows
  local["x"] = local["x"] + np.random.default_rng(0).normal(size=local["x"].shape).astype(
      np.float32)
  batch = mesh_lib.global_batch(local, mesh)
  key = jax.random.key(0)
  state = trainer.create_train_state(task, optimizer, key, batch, False,
                                     mesh_lib.replicated(mesh))
  results = {}
  for k in (1, 4):
    step = jax.jit(trainer.make_train_step(task, optimizer, lambda s: 0.1, 0.0, k))
    results[k] = step(state, None, batch, key)
  (full, full_metrics), (accum, accum_metrics) = results[1], results[4]
  np.testing.assert_allclose(accum.params["w"], full.params["w"], rtol=1e-5)
  np.testing.assert_allclose(accum_metrics["loss"], full_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(accum_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
  assert float(accum.model_state["seen"]) == float(full.model_state["seen"]) == 32
  assert not np.allclose(full.params["w"], state.params["w"])
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    mesh_lib.check_batch_size(32, mesh, 3)


def traced_steps(stage_dir):
  """The step numbers of the ``train`` step annotations in the stage's one trace."""
  traces = glob.glob(os.path.join(stage_dir, "profile", "plugins", "profile", "*",
                                  "*.trace.json.gz"))
  assert len(traces) == 1, traces
  assert glob.glob(os.path.join(os.path.dirname(traces[0]), "*.xplane.pb"))
  with gzip.open(traces[0]) as f:
    events = json.load(f)["traceEvents"]
  return sorted({int(e["args"]["step_num"]) for e in events if e.get("name") == "train"})


@pytest.mark.parametrize("preempt", [False, True])
def test_profile_steps_traces_the_steps_after_the_first(tmp_path, mesh, preempt):
  """profile_steps=3 traces steps 1..3 (0-based; step 0 compiles). A SIGTERM during step 2
  ends the run there, and the trace is still written with the steps it saw."""
  it = ToyIterator(on_batch=lambda n: preempt and n == 2 and os.kill(os.getpid(),
                                                                     signal.SIGTERM))
  result = run(tmp_path, mesh, cfg=train_cfg(profile_steps=3), it=it)
  assert result.preempted == preempt
  assert traced_steps(tmp_path / "linear") == ([1, 2] if preempt else [1, 2, 3])


def test_negative_profile_steps_is_refused(tmp_path, mesh):
  with pytest.raises(ValueError, match="profile_steps must be >= 0"):
    run(tmp_path, mesh, cfg=train_cfg(profile_steps=-1))
