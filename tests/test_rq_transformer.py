"""The RQ-Transformer baseline: causal masking, cached against uncached sampling, greedy
samples against the teacher-forced logits, the loss and top-k/top-p against numpy, the
tensor-parallel layout, and training through the shared trainer.

One tiny model (module fixtures) keeps the number of distinct compilations small."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from resgen_jax.baselines.rq_transformer import RQTransformerTask
from resgen_jax.generator import sampler
from resgen_jax import layers
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import optim, trainer

SIDE, DEPTH, CODES, LATENT, CLASSES = 4, 3, 8, 4, 4
POSITIONS = SIDE * SIDE
# adaLN-Zero starts every block as the identity; a perturbation makes attention matter.
PERTURBATION = 0.1


def make_task(model_overrides=None, **loss):
  cfg = tiny_config().generator
  cfg.model.update(width=32, num_layers=2, num_heads=2, mlp_ratio=2)
  cfg.model.update(model_overrides or {})
  cfg.rq.depth_layers = 2
  cfg.loss.update(dict(dict(cond_dropout=0.0), **loss))
  books = np.random.default_rng(5).normal(size=(DEPTH, CODES, LATENT)).astype(np.float32)
  return RQTransformerTask(cfg, books, POSITIONS, DEPTH, CLASSES)


def token_batch(n=4, seed=0):
  rng = np.random.default_rng(seed)
  return {"codes": jnp.asarray(rng.integers(0, CODES, (n, SIDE, SIDE, DEPTH)), jnp.int32),
          "label": jnp.asarray(rng.integers(0, CLASSES, (n,)), jnp.int32)}


@pytest.fixture(scope="module")
def task():
  return make_task()


@pytest.fixture(scope="module")
def initial_params(task):
  return jax.jit(task.init)(jax.random.key(0), token_batch())[0]


@jax.jit
def perturbed(params):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [x + PERTURBATION * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def params(initial_params):
  return perturbed(initial_params)


@pytest.fixture(scope="module")
def logits_fn(task):
  """Teacher-forced logits ``[B, L, D, V]`` of codes ``[B, L, D]``."""
  return jax.jit(lambda p, codes, labels: task.logits(p, task.codebooks, codes, labels))


def flat_logits(logits_fn, params, codes, labels):
  """Logits in generation order: ``[B, L * D, V]``."""
  return np.asarray(logits_fn(params, jnp.asarray(codes), labels)).reshape(
      codes.shape[0], POSITIONS * DEPTH, CODES)


@pytest.mark.parametrize("position, depth", [(5, 0), (5, 1), (9, 2)])
def test_logits_see_only_earlier_tokens(task, params, logits_fn, position, depth):
  batch = token_batch(n=3, seed=1)
  codes = np.asarray(batch["codes"]).reshape(3, POSITIONS, DEPTH)
  before = flat_logits(logits_fn, params, codes, batch["label"])
  changed = codes.copy()
  changed[:, position, depth] = (changed[:, position, depth] + 1) % CODES
  after = flat_logits(logits_fn, params, changed, batch["label"])
  t = position * DEPTH + depth  # token t's logits predict token t from the tokens before it
  np.testing.assert_array_equal(before[:, :t + 1], after[:, :t + 1])
  assert not np.allclose(before[:, t + 1], after[:, t + 1])  # the next token sees it
  # Two positions later, only through spatial attention (the input is position + 1's sum).
  later = slice((position + 2) * DEPTH, (position + 3) * DEPTH)
  assert not np.allclose(before[:, later], after[:, later])


def sampler_config(**overrides):
  scfg = tiny_config().sampler
  scfg.update(overrides)
  return scfg


def jit_sampler(task, scfg, use_cache):
  return jax.jit(lambda p, labels, rng: task.sample_codes(p, {}, task.codebooks, labels, rng,
                                                          scfg, use_cache))


def test_cached_sampling_equals_the_uncached_reference(task, params):
  scfg = sampler_config(temperature=1.0, top_k=5, top_p=0.9, cfg_scale=2.0)
  labels = jnp.asarray([0, 1, 3])
  cached, full = jit_sampler(task, scfg, True), jit_sampler(task, scfg, False)
  codes = np.asarray(cached(params, labels, jax.random.key(7)))
  assert codes.shape == (3, POSITIONS, DEPTH) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < CODES
  np.testing.assert_array_equal(codes, full(params, labels, jax.random.key(7)))
  assert not np.array_equal(codes, cached(params, labels, jax.random.key(8)))


@pytest.mark.parametrize("cfg_scale, cfg_ramp", [(1.0, "constant"), (3.0, "constant"),
                                                 (3.0, "linear")])
def test_greedy_samples_are_the_argmax_of_the_teacher_forced_logits(task, params, logits_fn,
                                                                    cfg_scale, cfg_ramp):
  """At temperature 0 every token is the argmax of the (guided) logits that the training
  forward gives on the finished grid, since those logits see only earlier tokens. A linear
  ramp weighs draw n (raster, then depth) by 1 + (w - 1) (n + 1) / (L D)."""
  labels = jnp.asarray([0, 2, 3])
  scfg = sampler_config(temperature=0.0, cfg_scale=cfg_scale, cfg_ramp=cfg_ramp)
  codes = jit_sampler(task, scfg, True)(params, labels, jax.random.key(0))
  cond = np.asarray(logits_fn(params, codes, labels))
  uncond = np.asarray(logits_fn(params, codes, jnp.full_like(labels, task.null_class)))
  draw = np.arange(POSITIONS * DEPTH).reshape(POSITIONS, DEPTH)
  weight = (1 + (cfg_scale - 1) * (draw + 1) / draw.size if cfg_ramp == "linear"
            else np.full(draw.shape, cfg_scale))
  guided = uncond + weight[..., None] * (cond - uncond)
  np.testing.assert_array_equal(codes, guided.argmax(-1))


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_is_the_cross_entropy_of_the_logits(task, params, logits_fn):
  batch = token_batch(n=4, seed=2)
  valid = np.ones((4, POSITIONS), bool)
  valid[1, 12:] = False  # a padded example: its last positions never enter the loss
  valid[3] = False  # all padding: weighs nothing (and is no NaN)
  batch["valid_positions"] = jnp.asarray(valid)
  loss, metrics = jax.jit(lambda p, b: task.losses(p, task.constants(), b, jax.random.key(0),
                                                   False))(params, batch)
  codes = np.asarray(batch["codes"]).reshape(4, POSITIONS, DEPTH)
  logits = np.asarray(logits_fn(params, jnp.asarray(codes), batch["label"]), np.float64)
  nll = -np.take_along_axis(np_log_softmax(logits), codes[..., None], -1)[..., 0]
  weights = np.broadcast_to(valid[..., None], nll.shape)
  np.testing.assert_allclose(float(loss), nll[weights].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["nll"]), nll[weights].mean(), rtol=1e-5)
  accuracy = (logits.argmax(-1) == codes)[weights].mean()
  np.testing.assert_allclose(float(metrics["accuracy"]), accuracy, rtol=1e-6)


def np_top_k_top_p(logits, top_k, top_p):
  out = np.full_like(logits, -np.inf)
  for row, result in zip(logits, out):
    order = np.argsort(-row, kind="stable")
    kept = order[:top_k] if top_k else order
    probs = np.exp(row[kept] - row[kept].max())
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    kept = kept[mass_before < top_p]
    result[kept] = row[kept]
  return out


def test_top_k_then_top_p_filtering_matches_numpy():
  logits = np.random.default_rng(3).normal(size=(16, 10)).astype(np.float32) * 2
  for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.6), (4, 0.8), (1, 0.5), (10, 0.3),
                       (0, 1e-6)]:
    got = np.asarray(sampler.filter_logits(jnp.asarray(logits), 1.0, top_k, top_p))
    np.testing.assert_array_equal(got, np_top_k_top_p(logits, top_k, top_p),
                                  err_msg=f"top_k={top_k} top_p={top_p}")
    assert np.isfinite(got).any(-1).all()


def test_training_through_the_shared_trainer_overfits_a_batch(task, initial_params):
  batch = token_batch(n=8, seed=4)
  params, state = initial_params, {}
  cfg = tiny_config().generator.train
  cfg.update(num_steps=50, learning_rate=3e-3, warmup_steps=1)
  optimizer = optim.make_optimizer(cfg)
  train_state = trainer.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
      model_state=state, ema_params={}, nonfinite_step=jnp.array(-1, jnp.int32))
  step = jax.jit(trainer.make_train_step(task, optimizer, optim.learning_rate_schedule(cfg),
                                         0.0))
  eval_step = jax.jit(task.eval_step)
  eval_batch = dict(batch, valid=jnp.ones((8,), bool))
  first = eval_step(train_state.params, state, task.constants(), eval_batch)
  losses = []
  for _ in range(8):
    train_state, metrics = step(train_state, task.constants(), batch, jax.random.key(1))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    # cond_dropout and dropout are 0: the training loss is the evaluation loss.
    assert float(metrics["loss"]) == pytest.approx(float(metrics["nll"]))
    losses.append(float(metrics["loss"]))
  assert int(train_state.nonfinite_step) == -1
  # The first step's loss is the one of the initial parameters.
  assert losses[0] == pytest.approx(float(first["loss"]) / float(first["count"]), rel=1e-5)
  last = eval_step(train_state.params, state, task.constants(), eval_batch)
  assert float(first["count"]) == 8 == float(last["count"])
  assert float(last["loss"]) / 8 < losses[0] - 0.2, losses
  # Warmup starts at a learning rate of 0: the first step changes nothing, each next one
  # lowers the loss.
  assert losses[1] == losses[0] and all(b < a for a, b in zip(losses[1:], losses[2:])), losses
  assert float(last["accuracy"]) > float(first["accuracy"])


def test_bfloat16_and_remat_train_with_float32_parameters(params):
  task = make_task(dict(dtype="bfloat16", remat=True,
                        remat_policy="dots_with_no_batch_dims_saveable"), cond_dropout=0.1)
  batch = token_batch()
  # The same parameters as the float32 model (reused: an eager init costs seconds).
  abstract = jax.eval_shape(lambda b: task.init(jax.random.key(0), b), batch)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract[0]) == jax.tree.map(
      lambda x: (x.shape, x.dtype), params)
  loss, grads, _, _ = jax.jit(task.loss_and_grads)(params, {}, task.constants(), batch,
                                                   jax.random.key(1), 0)
  assert np.isfinite(float(loss))
  assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
             for g in jax.tree.leaves(grads))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_tensor_parallel_rules_split_heads_and_mlp(task):
  abstract = jax.eval_shape(lambda b: task.init(jax.random.key(0), b)[0], token_batch())
  mesh = mesh_lib.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  rules = mesh_lib.ShardingRules(rules=layers.TENSOR_PARALLEL_RULES, fsdp_min_size=64)
  specs = {path: s.spec for path, s in zip(mesh_lib.tree_paths(abstract),
                                           jax.tree.leaves(rules.shardings(abstract, mesh)))}
  for stack in ("spatial_blocks_1", "depth_blocks_0"):
    for name in ("query", "key", "value"):
      assert specs[f"model/{stack}/attn/{name}/kernel"] == P("fsdp", "tensor", None)
    assert specs[f"model/{stack}/attn/out/kernel"] == P("tensor", None, "fsdp")
    assert specs[f"model/{stack}/mlp_in/kernel"] == P("fsdp", "tensor")
    assert specs[f"model/{stack}/mlp_out/kernel"] == P("tensor", "fsdp")
    assert specs[f"model/{stack}/modulation/kernel"] == P("fsdp", "tensor")


def test_bad_config_values_name_the_field(task, params):
  for overrides, message in [
      (dict(width=33), "model.width .*model.num_heads"), (dict(num_layers=0), "num_layers"),
      (dict(dtype="float16"), "model.dtype"), (dict(dropout=1.0), "model.dropout"),
      (dict(scan_layers=True), "scan_layers"),
      (dict(remat=True, remat_policy="nothing_please"), "remat_policy")]:
    with pytest.raises(ValueError, match=message):
      make_task(overrides)
  with pytest.raises(ValueError, match="cond_dropout"):
    make_task(cond_dropout=1.0)
  cfg = task.cfg.copy_and_resolve_references()
  cfg.rq.depth_layers = 0
  with pytest.raises(ValueError, match="rq.depth_layers"):
    RQTransformerTask(cfg, np.asarray(task.codebooks), POSITIONS, DEPTH, CLASSES)
  with pytest.raises(ValueError, match="depth=2"):
    RQTransformerTask(task.cfg, np.asarray(task.codebooks), POSITIONS, 2, CLASSES)
  for field, value in [("temperature", -1.0), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5)]:
    with pytest.raises(ValueError, match=f"sampler.{field}"):
      task.sample_codes(params, {}, task.codebooks, jnp.zeros((1,), jnp.int32),
                        jax.random.key(0), sampler_config(**{field: value}))
