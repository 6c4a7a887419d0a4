"""The direct-token baseline: cross-entropy on hidden tokens only against numpy, the shared
unmasking schedule, and guidance on its logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from resgen_jax.baselines.direct import DirectTokenTask, token_cross_entropy
from resgen_jax.generator import masking, sampler

B, L, D, V, d = 4, 6, 3, 8, 4
CLASSES = 5


@pytest.fixture(scope="module")
def task_and_params():
  rng = np.random.default_rng(0)
  books = rng.normal(size=(D, V, d)).astype(np.float32)
  task = DirectTokenTask(tiny_config().generator, books, L, D, CLASSES)
  batch = {"codes": jnp.asarray(rng.integers(0, V, (B, L, D)), jnp.int32),
           "label": jnp.asarray(rng.integers(0, CLASSES, B), jnp.int32)}
  params, state = task.init(jax.random.key(0), batch)
  # Random non-zero output weights: the freshly initialised head would be near uniform.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape),
                        params)
  return task, params, state, batch


def numpy_cross_entropy(logits, codes, weights):
  logits = np.asarray(logits, np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, np.asarray(codes)[..., None], axis=-1)[..., 0]
  return float(((log_z - picked) * weights).sum() / weights.sum())


def test_token_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(B, L, D, V)) * 3
  codes = rng.integers(0, V, (B, L, D))
  weights = (rng.random((B, L, D)) < 0.4).astype(np.float32)
  loss, accuracy = token_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(codes),
                                       jnp.asarray(weights))
  assert float(loss) == pytest.approx(numpy_cross_entropy(logits, codes, weights), rel=1e-5)
  hits = (logits.argmax(-1) == codes) * weights
  assert float(accuracy) == pytest.approx(hits.sum() / weights.sum(), rel=1e-6)


def test_loss_is_the_cross_entropy_of_hidden_tokens_only(task_and_params):
  task, params, state, batch = task_and_params
  rng = jax.random.key(3)
  loss, metrics = task.losses(params, state, task.constants(), batch, rng, train=False)
  # The same mask the task draws (its first key), and the network's logits under it.
  hidden = masking.sample_hidden_counts(jax.random.split(rng, 3)[0], jnp.ones((B, L), bool),
                                        D, masking.schedule(task.cfg.loss.schedule))
  network = task.network_fn(params, state, task.codebooks, batch["label"],
                            jnp.ones((B, L), bool))
  logits = network(batch["codes"], hidden, True)
  weights = np.asarray(masking.hidden_mask(hidden, D), np.float32)
  assert 0 < weights.sum() < weights.size
  assert float(loss) == pytest.approx(
      numpy_cross_entropy(logits, batch["codes"], weights), rel=1e-5)
  assert float(metrics["nll"]) == float(loss)
  # Visible tokens are inputs, not targets: the loss ignores their own logits.
  everywhere = numpy_cross_entropy(logits, batch["codes"], np.ones_like(weights))
  assert float(loss) != pytest.approx(everywhere, rel=1e-3)


def test_sampling_reveals_on_the_resgen_schedule_and_keeps_known_tokens(task_and_params):
  task, params, state, _ = task_and_params
  cfg = tiny_config().sampler
  cfg.update(steps=4, cfg_scale=2.0, top_k=3, top_p=0.9)
  labels = jnp.arange(B) % CLASSES
  known = np.zeros((B, L, D), bool)
  known[:, 0, :2] = True  # a prompt: the first two depths of position 0
  start = np.full((B, L, D), 5, np.int32)
  network = task.network_fn(params, state, task.codebooks, labels, jnp.ones((B, L), bool))
  out = jax.jit(lambda r: sampler.unmask(sampler.token_proposal(network, cfg),
                                         jnp.asarray(start), jnp.asarray(known), r, cfg))(
                                             jax.random.key(0))
  codes, steps = np.asarray(out.codes), np.asarray(out.reveal_step)
  np.testing.assert_array_equal(codes[known], 5)
  assert codes.min() >= 0 and codes.max() < V
  table = sampler.schedule_table(masking.schedule(cfg.schedule), cfg.steps, L * D)
  initial = L * D - known[0].sum()
  before = initial
  for t in range(1, cfg.steps + 1):  # tokens revealed at step t: the schedule's count
    assert ((steps == t).sum(axis=(1, 2)) == before - table[t - 1, initial]).all()
    before = table[t - 1, initial]
  assert before == 0
  # Revealed tokens extend each position's depth prefix: step numbers never fall with depth.
  assert (np.diff(np.where(known, 0, steps), axis=-1) >= 0).all()
  with_codes = task.sample_codes(params, state, task.codebooks, labels, jax.random.key(0), cfg)
  assert with_codes.shape == (B, L, D)


def test_guidance_mixes_conditional_and_null_logits(task_and_params):
  task, params, state, batch = task_and_params
  cfg = tiny_config().sampler
  cfg.cfg_scale = 3.0
  valid = jnp.ones((B, L), bool)
  network = task.network_fn(params, state, task.codebooks, batch["label"], valid)
  hidden = jnp.full((B, L), D, jnp.int32)
  cond, uncond = network(batch["codes"], hidden, True), network(batch["codes"], hidden, False)
  mixed = sampler.guided(network, cfg, jnp.asarray(1), batch["codes"], hidden)
  np.testing.assert_allclose(mixed, np.asarray(uncond) + 3.0 * (np.asarray(cond) - uncond),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(cond, uncond)  # the class matters
