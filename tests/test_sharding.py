"""Layouts on device meshes: data parallel, FSDP and tensor parallel give the same training
step, state is laid out as the rules say, and checkpoints move between meshes.

Needs 8 devices: conftest.py asks XLA for 8 host-platform CPU devices.
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from resgen_jax import layers
from resgen_jax.generator.task import GeneratorTask
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import trainer

DEPTH, POSITIONS, CLASSES, CODES, LATENT = 3, 6, 4, 8, 4
BATCH = 16
# Every tiny-model matrix is sharded under fsdp (the default minimum would skip them all).
SMALL_FSDP = mesh_lib.ShardingRules(fsdp_min_size=64)
TENSOR = mesh_lib.ShardingRules(rules=layers.TENSOR_PARALLEL_RULES, fsdp_min_size=64)

pytestmark = [pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices"),
              pytest.mark.usefixtures("quick_compile")]


def tiny_task():
  cfg = tiny_config().generator
  cfg.model.update(width=32, num_layers=2, num_heads=2, num_components=4, low_rank=4)
  books = np.random.default_rng(5).normal(size=(DEPTH, CODES, LATENT)).astype(np.float32)
  return GeneratorTask(cfg, books, POSITIONS, DEPTH, CLASSES)


def local_batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"codes": rng.integers(0, CODES, (BATCH, POSITIONS, DEPTH)).astype(np.int32),
          "label": rng.integers(0, CLASSES, (BATCH,)).astype(np.int32)}


def meshes():
  devices = jax.devices()
  return {
      "1 device": mesh_lib.make_mesh(("data",), (1,), devices[:1]),
      "8 data": mesh_lib.make_mesh(("data",), (8,)),
      "4x2 data x fsdp": mesh_lib.make_mesh(("data", "fsdp"), (4, 2)),
      "2x2x2 data x fsdp x tensor": mesh_lib.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2)),
  }


# Adam's first step is lr * sign(g) where |g| >> eps, which would turn float rounding of
# a near-zero gradient into a difference of 2 lr; a large eps keeps the update linear there.
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-2))


def one_step(mesh, rules):
  task = tiny_task()
  batch = mesh_lib.global_batch(local_batch(), mesh)
  key = jax.random.key(0)
  _, shardings = trainer.state_layout(task, OPTIMIZER, key, batch, True, mesh, rules)
  state = trainer.create_train_state(task, OPTIMIZER, key, batch, True, shardings)
  step = jax.jit(trainer.make_train_step(task, OPTIMIZER, lambda s: 1e-2, 0.9),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)))
  with rules.activations(mesh):
    new, metrics = step(state, task.constants(), batch, jax.random.key(1))
    hlo = step.lower(state, task.constants(), batch, jax.random.key(1)).as_text()
  return state, new, metrics, hlo


@pytest.fixture(scope="module")
def steps():
  return {name: one_step(mesh, TENSOR if "tensor" in name else SMALL_FSDP)
          for name, mesh in meshes().items()}


def test_same_batch_gives_the_same_step_on_every_mesh(steps):
  _, reference, ref_metrics, _ = steps["1 device"]
  for name, (_, new, metrics, _) in steps.items():
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]),
                               rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(reference.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                 err_msg=name)
    for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(reference.opt_state)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                 err_msg=name)


def leaf(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def test_state_is_laid_out_as_the_rules_say(steps):
  mlp_in = "model/block_0/mlp_in/kernel"  # [32, 128]
  query = "model/block_0/attn/query/kernel"  # [32, 2, 16]
  expected = {  # (mlp_in, query, devices per piece of mlp_in)
      "1 device": (P(), P(), 1),
      "8 data": (P(), P(), 1),
      "4x2 data x fsdp": (P(None, "fsdp"), P("fsdp", None, None), 2),  # largest dim fsdp divides
      "2x2x2 data x fsdp x tensor": (P("fsdp", "tensor"), P("fsdp", "tensor", None), 4),
  }
  for name, (state, new, _, _) in steps.items():
    mlp_spec, query_spec, pieces = expected[name]
    kernel = leaf(state.params, mlp_in)
    assert kernel.sharding.spec == mlp_spec, name
    assert leaf(state.params, query).sharding.spec == query_spec, name
    if pieces == 1:
      assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    # Every device holds only its piece, from creation on.
    assert kernel.addressable_shards[0].data.size == kernel.size // pieces
    # Optimizer moments and the EMA follow their parameter; the step keeps every layout.
    assert leaf(new.opt_state[1][0].mu, mlp_in).sharding.spec == mlp_spec
    assert leaf(new.ema_params, mlp_in).sharding.spec == mlp_spec
    assert jax.tree.map(lambda x: x.sharding, new) == jax.tree.map(lambda x: x.sharding, state)
    assert state.step.sharding.is_fully_replicated  # scalars stay whole


def test_activations_are_constrained_as_the_activation_rules_say(steps):
  # The residual stream [B, L, width] and the MLP hidden units [B, L, mlp] of the train step.
  batch_only = '[{"data", "fsdp"}, {}, {}]'
  assert batch_only in steps["4x2 data x fsdp"][3]
  assert '[{"data", "fsdp"}, {}, {"tensor"}]' in steps["2x2x2 data x fsdp x tensor"][3]
  assert '[{"data"}, {}, {}]' in steps["8 data"][3]  # axes absent from the mesh are dropped


def test_leaf_spec_drops_axes_that_do_not_fit_and_checks_rules():
  mesh = mesh_lib.make_mesh(("data", "fsdp"), (4, 2))
  # tensor is not in this mesh: it is dropped, fsdp stays.
  assert mesh_lib.leaf_spec("a/mlp_in/kernel", (32, 128), mesh, TENSOR.rules, 0) == P(
      "fsdp", None)
  tensor = mesh_lib.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  # Scanned layers keep their leading layer axis whole; unrolled ones use the plain rule.
  assert mesh_lib.leaf_spec("p/model/blocks/block/mlp_in/kernel", (3, 32, 128), tensor,
                            TENSOR.rules, 0) == P(None, "fsdp", "tensor")
  assert mesh_lib.leaf_spec("p/model/block_2/mlp_in/kernel", (32, 128), tensor,
                            TENSOR.rules, 0) == P("fsdp", "tensor")
  assert mesh_lib.leaf_spec("a/w", (7, 5), mesh, (), 0) == P()  # fsdp divides neither
  assert mesh_lib.leaf_spec("a/w", (7, 6), mesh, (), 0) == P(None, "fsdp")
  assert mesh_lib.leaf_spec("a/w", (64, 64), mesh, (), 10_000) == P()  # below the minimum
  assert mesh_lib.leaf_spec("a/w", (64, 64), mesh, ((r"/w$", (None, None)),), 0) == P(
      None, None)
  with pytest.raises(ValueError, match="gives 1 axes"):
    mesh_lib.leaf_spec("a/mlp_in/kernel", (4, 4), mesh, ((r"mlp_in", ("fsdp",)),), 0)
  with pytest.raises(ValueError, match="not a regular expression"):
    mesh_lib.ShardingRules(rules=(("(", ("fsdp",)),))
  with pytest.raises(ValueError, match=r"names mesh axes \['tensr'\]"):
    mesh_lib.ShardingRules(rules=(("w$", ("fsdp", "tensr")),))
  with pytest.raises(ValueError, match="uses a mesh axis twice"):
    mesh_lib.ShardingRules(rules=(("w$", ("fsdp", "fsdp")),))
  with pytest.raises(ValueError, match="activation_rules entry 'mlp'"):
    mesh_lib.ShardingRules(activation_rules=(("mlp", "model"),))
  with pytest.raises(ValueError, match="must be distinct names"):
    mesh_lib.make_mesh(("data", "model"), (4, 2))
  with pytest.raises(ValueError, match="number of batch shards 8"):
    mesh_lib.check_batch_size(12, mesh)


class TokenIterator:
  def __init__(self):
    self.n = 0

  def __next__(self):
    self.n += 1
    return local_batch(self.n)

  def get_state(self):
    return {"n": self.n}

  def set_state(self, state):
    self.n = state["n"]


def test_fsdp_checkpoint_restores_on_one_device_and_resumes_on_another_mesh(tmp_path):
  cfg = tiny_config(num_steps=2).generator.train
  cfg.update(eval_every=0, log_every=1, checkpoint_every=2)
  task = tiny_task()
  fsdp = mesh_lib.make_mesh(("data", "fsdp"), (4, 2))
  eval_batches = lambda: [dict(local_batch(99), valid=np.ones((BATCH,), bool))]
  result = trainer.train_and_evaluate(task, cfg, str(tmp_path), TokenIterator(), eval_batches,
                                      fsdp, seed=0, rules=SMALL_FSDP)
  assert leaf(result.state.params, "model/block_0/mlp_in/kernel").sharding.spec == P(
      None, "fsdp")

  single = mesh_lib.make_mesh(("data",), (1,), jax.devices()[:1])
  example = mesh_lib.global_batch(local_batch(), single)
  restored = trainer.load_trained_state(task, cfg, str(tmp_path), example, single, seed=0)
  assert restored.opt_state is None  # inference reads no optimizer state
  trained = (result.state.step, result.state.params, result.state.ema_params,
             result.state.model_state)
  loaded = (restored.step, restored.params, restored.ema_params, restored.model_state)
  assert jax.tree.structure(loaded) == jax.tree.structure(trained)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trained)):
    assert a.sharding.is_fully_replicated and len(a.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The same run goes on with tensor parallelism on another mesh shape.
  cfg.num_steps = 3
  tensor = mesh_lib.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  more = trainer.train_and_evaluate(task, cfg, str(tmp_path), TokenIterator(), eval_batches,
                                    tensor, seed=0, rules=TENSOR)
  assert int(more.state.step) == 3
  assert leaf(more.state.params, "model/block_0/mlp_in/kernel").sharding.spec == P(
      "fsdp", "tensor")


def test_imagenet_generator_state_is_split_over_fsdp_and_tensor():
  """The paper-size generator's rules, checked on shapes alone (nothing is allocated)."""
  import os  # pylint: disable=g-import-not-at-top
  from resgen_jax import config_base  # pylint: disable=g-import-not-at-top
  from resgen_jax.train import optim  # pylint: disable=g-import-not-at-top
  config = config_base.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet.py"))
  depth = config.tokenizer.quantizer.depth
  books = np.zeros((1, 16, config.tokenizer.model.latent_dim), np.float32)
  task = GeneratorTask(config.generator, books, 64, depth, 1000)
  mesh = mesh_lib.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))
  batch = {"codes": jax.ShapeDtypeStruct((8, 8, 8, depth), np.int32,
                                         sharding=mesh_lib.batch_sharding(mesh)),
           "label": jax.ShapeDtypeStruct((8,), np.int32, sharding=mesh_lib.batch_sharding(mesh))}
  abstract, _ = trainer.state_layout(task, optim.make_optimizer(config.generator.train),
                                     jax.random.key(0), batch, True, mesh,
                                     mesh_lib.ShardingRules.from_config(config.mesh))
  total = per_device = 0
  for leaf in jax.tree.leaves(abstract):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += leaf.size
    per_device += int(np.prod(shard))
    if leaf.size >= config.mesh.fsdp_min_size * 4:  # every large leaf is split
      assert np.prod(shard) < leaf.size, leaf
  # Parameters, two Adam moments and the EMA of ~576M parameters, split 4 ways (fsdp x
  # tensor) up to the few small leaves that stay whole.
  assert 4 * 0.9 * 576e6 < total < 4 * 1.1 * 576e6
  assert per_device < 0.27 * total
