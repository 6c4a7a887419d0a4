"""The generator: masking invariants, targets and losses against numpy, the network's
padding mask, target normalisation, and one real training step."""

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import tiny_config
from resgen_jax import config_base
from resgen_jax.codec import rvq
from resgen_jax.generator import masking, mixture, sampler
from resgen_jax.generator.model import ResGenTransformer
from resgen_jax.generator.task import GeneratorTask
from resgen_jax.train import optim, trainer

pytestmark = pytest.mark.usefixtures("quick_compile")


def test_schedules_go_from_all_hidden_to_none():
  for name in masking.SCHEDULES:
    gamma = masking.schedule(name)
    assert float(gamma(jnp.asarray(0.0))) == pytest.approx(1.0)
    assert float(gamma(jnp.asarray(1.0))) == pytest.approx(0.0, abs=1e-6)
    values = np.asarray(gamma(jnp.linspace(0, 1, 11)))
    assert (np.diff(values) <= 1e-7).all(), name
  with pytest.raises(ValueError, match="unknown mask schedule"):
    masking.schedule("exp")


def test_mask_totals_prefix_and_padding():
  batch, length, depth = 64, 7, 5
  valid = np.ones((batch, length), bool)
  valid[::3, 5:] = False  # some examples are shorter
  ratio = jnp.asarray(np.random.default_rng(0).random(batch), jnp.float32)
  gamma = masking.schedule("cosine")
  k = np.asarray(masking.sample_hidden_counts(jax.random.key(1), jnp.asarray(valid), depth,
                                              gamma, ratio=ratio))
  totals = valid.sum(1) * depth
  expected = np.clip(np.ceil(np.cos(np.pi * np.asarray(ratio) / 2) * totals), 1, totals)
  np.testing.assert_array_equal(k.sum(1), expected)
  assert (k[~valid] == 0).all() and (k >= 0).all() and (k <= depth).all()
  mask = np.asarray(masking.hidden_mask(jnp.asarray(k), depth))
  # Hidden tokens are a top run of depths: once hidden, every finer depth is hidden too.
  assert not (mask[..., :-1] & ~mask[..., 1:]).any()
  np.testing.assert_array_equal(mask.sum(-1), k)


def test_slots_are_chosen_uniformly_without_replacement():
  """With n fixed, each position's hidden count is hypergeometric(L*D, D, n)."""
  draws, length, depth, n = 4000, 6, 4, 9
  total = length * depth
  ratio = jnp.full((draws,), 0.0)
  gamma = lambda r: jnp.full_like(r, n / total)
  k = np.asarray(masking.sample_hidden_counts(
      jax.random.key(7), jnp.ones((draws, length), bool), depth, gamma, ratio=ratio))
  assert (k.sum(1) == n).all()
  expected = stats.hypergeom(total, depth, n).pmf(np.arange(depth + 1))
  for position in range(length):
    observed = np.bincount(k[:, position], minlength=depth + 1)
    chi2 = stats.chisquare(observed[expected > 0],
                           expected[expected > 0] * draws * observed.sum() / draws /
                           expected[expected > 0].sum())
    assert chi2.pvalue > 1e-3, (position, observed, expected * draws)


def test_visible_and_hidden_sums_match_numpy():
  rng = np.random.default_rng(3)
  depth, dim = 4, 3
  books = rng.normal(size=(depth, 6, dim)).astype(np.float32)
  codes = rng.integers(0, 6, (2, 5, depth))
  k = rng.integers(0, depth + 1, (2, 5))
  visible, hidden = masking.split_embeddings(rvq.embed(jnp.asarray(codes), jnp.asarray(books)),
                                             jnp.asarray(k))
  ref_vis, ref_hid = np.zeros((2, 5, dim)), np.zeros((2, 5, dim))
  for b in range(2):
    for i in range(5):
      for j in range(depth):
        target = ref_hid if j >= depth - k[b, i] else ref_vis
        target[b, i] += books[j, codes[b, i, j]]
  np.testing.assert_allclose(visible, ref_vis, atol=1e-5)
  np.testing.assert_allclose(hidden, ref_hid, atol=1e-5)


def np_losses(target, logits, means, sigma, weights, learned):
  sq = ((target[..., None, :] - means) ** 2).sum(-1) / (2 * sigma ** 2)
  q = np.exp(-sq - (-sq).max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  log_pi = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  cls = -(q * log_pi).sum(-1)
  reg = (q * sq).sum(-1) + (target.shape[-1] * np.log(sigma) if learned else 0.0)
  d = target.shape[-1]
  log_n = -sq - d * np.log(sigma) - 0.5 * d * np.log(2 * np.pi)
  nll = -np.log((np.exp(log_pi + log_n)).sum(-1))
  mean = lambda v: (v * weights).sum() / weights.sum()
  return mean(cls), mean(reg), mean(nll)


@pytest.mark.parametrize("learned", [False, True])
def test_losses_match_numpy(learned):
  rng = np.random.default_rng(4)
  target = rng.normal(size=(3, 4, 5))
  logits = rng.normal(size=(3, 4, 6))
  means = rng.normal(size=(3, 4, 6, 5))
  weights = (rng.random((3, 4)) < 0.6).astype(np.float64)
  sigma = 0.7
  cls, reg, nll = np_losses(target, logits, means, sigma, weights, learned)
  args = [jnp.asarray(x, jnp.float32) for x in (target, logits, means)]
  log_sigma = jnp.asarray(math.log(sigma), jnp.float32)
  got = mixture.jensen_losses(*args, log_sigma, jnp.asarray(weights, jnp.float32), learned)
  np.testing.assert_allclose(got["cls"], cls, rtol=1e-5)
  np.testing.assert_allclose(got["reg"], reg, rtol=1e-5)
  np.testing.assert_allclose(
      mixture.mixture_nll(*args, log_sigma, jnp.asarray(weights, jnp.float32)), nll, rtol=1e-5)
  # The Jensen split bounds the exact NLL from above, up to the Gaussian's normaliser.
  d = target.shape[-1]
  assert cls + reg + (0 if learned else d * np.log(sigma)) + 0.5 * d * np.log(
      2 * np.pi) >= nll - 1e-6


def test_losses_with_a_sigma_per_position_match_numpy():
  """log_sigma [B, L] (sigma_per_count): every position's Gaussian has its own sigma."""
  rng = np.random.default_rng(7)
  target, logits = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 6))
  means, weights = rng.normal(size=(3, 4, 6, 5)), np.ones((3, 4))
  sigma = rng.uniform(0.2, 1.5, size=(3, 4))
  expected = [np_losses(target[b:b + 1, i:i + 1], logits[b:b + 1, i:i + 1],
                        means[b:b + 1, i:i + 1], sigma[b, i], weights[b:b + 1, i:i + 1], True)
              for b in range(3) for i in range(4)]
  args = [jnp.asarray(x, jnp.float32) for x in (target, logits, means)]
  log_sigma = jnp.asarray(np.log(sigma), jnp.float32)
  got = mixture.jensen_losses(*args, log_sigma, jnp.asarray(weights, jnp.float32), True)
  np.testing.assert_allclose(got["cls"], np.mean([e[0] for e in expected]), rtol=1e-5)
  np.testing.assert_allclose(got["reg"], np.mean([e[1] for e in expected]), rtol=1e-5)
  nll = mixture.position_nll(*args, log_sigma)
  np.testing.assert_allclose(nll, np.reshape([e[2] for e in expected], (3, 4)), rtol=1e-5)
  hidden = rng.integers(0, 4, size=(3, 4))
  by_count = mixture.nll_by_count(nll, jnp.asarray(hidden), jnp.asarray(weights), 3)
  for k in (1, 2, 3):
    chosen = np.asarray(nll)[hidden == k]
    np.testing.assert_allclose(by_count[k - 1], chosen.mean() if chosen.size else 0.0,
                               rtol=1e-6)


def tiny_task(depth=3, num_positions=6, classes=4, **loss):
  cfg = tiny_config().generator
  cfg.model.update(width=32, num_layers=2, num_heads=2, num_components=4, low_rank=4)
  cfg.loss.update(loss)
  books = np.random.default_rng(5).normal(size=(depth, 8, 4)).astype(np.float32)
  return GeneratorTask(cfg, books, num_positions, depth, classes), books


def token_batch(n=8, positions=6, depth=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"codes": jnp.asarray(rng.integers(0, 8, (n, positions, depth)), jnp.int32),
          "label": jnp.asarray(rng.integers(0, 4, (n,)), jnp.int32)}


def test_a_learned_sigma_per_hidden_count():
  with pytest.raises(ValueError, match="needs generator.loss.learn_sigma=True"):
    tiny_task(sigma_per_count=True)
  task, _ = tiny_task(learn_sigma=True, sigma_per_count=True, sigma=0.5)
  batch = token_batch()
  params, state = task.init(jax.random.key(0), batch)
  state = task.data_init(params, state, batch, jax.random.key(1))
  assert params["log_sigma"].shape == (task.depth + 1,)
  np.testing.assert_allclose(params["log_sigma"], math.log(0.5))
  params["log_sigma"] = jnp.log(jnp.asarray([9.0, 0.2, 0.4, 0.8]))
  hidden = jnp.asarray([[0, 1, 2, 3, 3, 1]])
  np.testing.assert_allclose(task.position_log_sigma(params, hidden),
                             np.log([[9.0, 0.2, 0.4, 0.8, 0.8, 0.2]]), rtol=1e-6)
  rms = np.asarray(state["target_rms"])
  np.testing.assert_allclose(task.embedding_sigma(params, state, hidden),
                             np.array([[9.0, 0.2, 0.4, 0.8, 0.8, 0.2]]) * rms[hidden],
                             rtol=1e-5)
  grads = jax.grad(lambda p: task.losses(p, state, task.constants(), batch,
                                         jax.random.key(2), True)[0])(params)
  assert float(grads["log_sigma"][0]) == 0.0  # k = 0 is never scored
  assert np.all(np.asarray(grads["log_sigma"][1:]) != 0.0)


@pytest.mark.parametrize("rule", ["position", "tokens"])
def test_the_loss_weighs_positions_by_the_rule(rule):
  """loss.position_weight: the task's loss is the numpy Jensen split over its own mask, each
  scored position weighted 1 ("position") or by its hidden count ("tokens")."""
  task, books = tiny_task(position_weight=rule)
  batch = token_batch()
  params, state = task.init(jax.random.key(0), batch)
  state = task.data_init(params, state, batch, jax.random.key(1))
  key = jax.random.key(4)
  loss, metrics = task.losses(params, state, task.constants(), batch, key, False)
  m = task.masked_batch(task.constants(), batch, key, False)
  hidden = np.asarray(m["hidden"])
  logits, means = task.model.apply({"params": params["model"]}, m["visible"], m["hidden"],
                                   m["labels"], m["valid"])
  target = np.asarray(m["target"]) / np.asarray(state["target_rms"])[hidden][..., None]
  scored = (hidden > 0).astype(np.float64)
  weights = scored * hidden if rule == "tokens" else scored
  cls, reg, _ = np_losses(target, np.asarray(logits, np.float64), np.asarray(means, np.float64),
                          0.5, weights, False)
  _, _, nll = np_losses(target, np.asarray(logits, np.float64), np.asarray(means, np.float64),
                        0.5, scored, False)
  assert len(np.unique(hidden[hidden > 0])) > 1  # the rules differ on this mask
  np.testing.assert_allclose(loss, cls + reg, rtol=1e-4)
  np.testing.assert_allclose(metrics["nll"], nll, rtol=1e-4)  # per position either way
  with pytest.raises(ValueError, match="position_weight must be one of"):
    tiny_task(position_weight="depth")


class TailOracle:
  """Stands in for the network: the exact hidden sum of known codes (times ``sign``) as the
  only component's mean, in normalised units."""

  def __init__(self, codes, books, rms, sign=1.0):
    self.full = rvq.dequantize(codes, books)
    self.rms, self.sign = rms, sign

  def apply(self, variables, visible, hidden, labels, valid, text=None):
    means = self.sign * (self.full - visible) / self.rms[hidden][..., None]
    return jnp.zeros(hidden.shape + (1,)), means[..., None, :]


def test_requantization_matches_count_the_recovered_tokens():
  depth = 3
  corners = np.array(list(itertools.product([-1.0, 1.0], repeat=3)), np.float32)
  books = np.stack([corners * 0.25 ** j for j in range(depth)])  # exact re-quantization
  cfg = tiny_config().generator
  task = GeneratorTask(cfg, books, 6, depth, 4)
  rng = np.random.default_rng(8)
  batch = {"codes": jnp.asarray(rng.integers(0, 8, (8, 6, depth)), jnp.int32),
           "label": jnp.zeros((8,), jnp.int32)}
  state = {"target_rms": jnp.asarray([1.0, 0.3, 0.5, 0.9])}
  key = jax.random.key(3)
  hidden = task.masked_batch(task.constants(), batch, key, False)["hidden"]
  task.model = TailOracle(batch["codes"], books, state["target_rms"])
  got = task.requantization_matches({"model": {}}, state, task.constants(), batch, key)
  counts = [int(np.sum(np.asarray(hidden) == k)) for k in range(1, depth + 1)]
  np.testing.assert_array_equal(got["first_count"], counts)
  np.testing.assert_array_equal(got["first_hit"], counts)
  per_depth = [int(np.sum(np.asarray(hidden) >= depth - j)) for j in range(depth)]
  np.testing.assert_array_equal(got["depth_count"], per_depth)
  np.testing.assert_array_equal(got["depth_hit"], per_depth)
  # The opposite of every hidden sum lands on the opposite corner: no token recovered.
  task.model = TailOracle(batch["codes"], books, state["target_rms"], sign=-1.0)
  got = task.requantization_matches({"model": {}}, state, task.constants(), batch, key)
  np.testing.assert_array_equal(got["first_count"], counts)
  np.testing.assert_array_equal(got["first_hit"], 0)


def test_padding_never_changes_real_positions():
  task, _ = tiny_task()
  rng = np.random.default_rng(6)
  visible = rng.normal(size=(2, 6, 4)).astype(np.float32)
  hidden = rng.integers(0, 4, (2, 6))
  valid = np.ones((2, 6), bool)
  valid[:, 4:] = False
  labels = jnp.asarray([1, 2])
  params = task.model.init(jax.random.key(0), jnp.asarray(visible), jnp.asarray(hidden), labels,
                           jnp.asarray(valid))
  # adaLN-Zero starts every block as the identity; perturb so attention matters.
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                        params)
  apply = jax.jit(lambda v, h: task.model.apply(params, v, h, labels, jnp.asarray(valid)))
  out = apply(jnp.asarray(visible), jnp.asarray(hidden))
  visible2, hidden2 = visible.copy(), hidden.copy()
  visible2[:, 4:] = 100.0 * rng.normal(size=(2, 2, 4))
  hidden2[:, 4:] = 3
  out2 = apply(jnp.asarray(visible2), jnp.asarray(hidden2))
  for a, b in zip(out, out2):
    np.testing.assert_allclose(np.asarray(a)[:, :4], np.asarray(b)[:, :4], atol=1e-5)
  # Without the mask the same change does reach the real positions.
  free = jax.jit(lambda v, h: task.model.apply(params, v, h, labels, None))
  assert not np.allclose(free(jnp.asarray(visible), jnp.asarray(hidden))[1][:, :4],
                         free(jnp.asarray(visible2), jnp.asarray(hidden2))[1][:, :4])


def test_target_normalisation_from_data_and_network_fn_undoes_it():
  task, books = tiny_task()
  batch = token_batch()
  params, state = task.init(jax.random.key(0), batch)
  state = task.data_init(params, state, batch, jax.random.key(1))
  emb = books[np.arange(3), np.asarray(batch["codes"])]  # [B, L, D, d]
  for k in range(1, 4):
    tail = emb[..., 3 - k:, :].sum(-2)
    np.testing.assert_allclose(state["target_rms"][k], np.sqrt((tail ** 2).mean()), rtol=1e-5)
  assert float(state["target_rms"][0]) == 1.0
  codes, labels, valid = task.flatten(batch)
  hidden = jnp.full(codes.shape[:2], 2)
  net = task.network_fn(params, state, jnp.asarray(books), labels, valid)
  logits, means = net(codes, hidden, True)
  visible, _ = masking.split_embeddings(rvq.embed(codes, jnp.asarray(books)), hidden)
  raw_logits, raw_means = task.model.apply({"params": params["model"]}, visible, hidden, labels,
                                           valid)
  np.testing.assert_allclose(logits, raw_logits, atol=1e-6)
  np.testing.assert_allclose(means, raw_means * state["target_rms"][2], atol=1e-5)


def test_sampling_projects_only_the_drawn_components_mean():
  """The sampler's low-rank path (component drawn from the rows' logits, then only its row
  mapped to d) gives the means of the full head and the same tokens, with and without CFG."""
  task, books = tiny_task()
  batch = token_batch()
  params, state = task.init(jax.random.key(0), batch)
  state = task.data_init(params, state, batch, jax.random.key(1))
  rng = np.random.default_rng(3)
  model = dict(params["model"], mean_scale=jnp.asarray(rng.normal(size=4), jnp.float32),
               mean_shift=jnp.asarray(rng.normal(size=4), jnp.float32))
  params = dict(params, model=model)  # a non-trivial affine map after the projection
  codes, labels, valid = task.flatten(batch)
  hidden = jnp.asarray(rng.integers(0, 4, codes.shape[:2]), jnp.int32)
  full = task.network_fn(params, state, jnp.asarray(books), labels, valid)
  lean = task.network_fn(params, state, jnp.asarray(books), labels, valid, low_rank=True)
  logits, means = full(codes, hidden, True)
  lean_logits, rows = lean(codes, hidden, True)
  assert rows.shape == means.shape[:-1] + (4,)  # [B, L, K, r]
  np.testing.assert_array_equal(logits, lean_logits)
  projected = task.project_fn(params, state)(rows[:, :, 2], hidden)
  np.testing.assert_allclose(projected, means[:, :, 2], rtol=1e-5, atol=1e-6)
  for cfg_scale in (1.0, 2.5):
    scfg = tiny_config().sampler
    scfg.update(cfg_scale=cfg_scale, steps=4)
    reference = sampler.unmask(
        sampler.mixture_proposal(full, jnp.asarray(books), scfg), jnp.zeros_like(codes),
        jnp.zeros(codes.shape, bool), jax.random.key(4), scfg)
    ours = task.infill(params, state, jnp.asarray(books), jnp.zeros_like(codes),
                       jnp.zeros(codes.shape, bool), valid, labels, jax.random.key(4), scfg)
    np.testing.assert_array_equal(ours.codes, reference.codes)
    np.testing.assert_array_equal(ours.reveal_step, reference.reveal_step)
  # sampler.dtype=bfloat16 runs the float32 parameters in bf16: close, not the same.
  half_logits, half_rows = task.network_fn(params, state, jnp.asarray(books), labels, valid,
                                           low_rank=True, dtype="bfloat16")(codes, hidden, True)
  assert not np.array_equal(half_logits, logits)
  np.testing.assert_allclose(half_logits, logits, atol=0.1 * np.abs(logits).max())
  np.testing.assert_allclose(half_rows, rows, atol=0.1 * np.abs(rows).max())


@pytest.mark.parametrize("kind, learn_sigma", [("jensen", False), ("nll", True)])
def test_one_training_step(kind, learn_sigma):
  task, _ = tiny_task(kind=kind, learn_sigma=learn_sigma)
  batch = token_batch()
  params, state = task.init(jax.random.key(0), batch)
  state = task.data_init(params, state, batch, jax.random.key(1))
  cfg = tiny_config().generator.train
  optimizer = optim.make_optimizer(cfg)
  train_state = trainer.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
      model_state=state, ema_params={}, nonfinite_step=jnp.array(-1, jnp.int32))
  step = jax.jit(trainer.make_train_step(task, optimizer, lambda s: 1e-3, 0.0))
  s1, m1 = step(train_state, task.constants(), batch, jax.random.key(2))
  s2, m2 = step(s1, task.constants(), batch, jax.random.key(2))
  for m in (m1, m2):
    assert all(np.isfinite(float(v)) for v in m.values())
    assert 0 < float(m["mask_ratio"]) <= 1
    assert 0 <= float(m["mixture_entropy"]) <= math.log(4) + 1e-5
  expected = float(m2["nll"]) if kind == "nll" else float(m2["cls"] + m2["reg"])
  assert float(m2["loss"]) == pytest.approx(expected, rel=1e-5)
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params))]
  assert any(moved)
  if learn_sigma:
    assert float(s1.params["log_sigma"]) != float(s2.params["log_sigma"])
    assert float(m2["sigma"]) == pytest.approx(math.exp(float(s1.params["log_sigma"])))
  # Per-count NLLs: the positions hiding k tokens, k = 1..D; the loss weights them by count.
  assert all(np.isfinite(float(m2[f"nll_k{k}"])) for k in range(1, task.depth + 1))
  sums = jax.jit(task.eval_step)(s2.params, s2.model_state, task.constants(),
                                 dict(batch, valid=jnp.ones((8,), bool)))
  assert float(sums["count"]) == 8 and np.isfinite(float(sums["loss"]))


def test_bad_generator_config_values():
  for field, value, message in [("kind", "mse", "loss.kind"), ("cond_dropout", 1.0, "cond_dropout"),
                                ("sigma", 0.0, "sigma"), ("schedule", "exp", "mask schedule")]:
    with pytest.raises(ValueError, match=message):
      tiny_task(**{field: value})
  task, _ = tiny_task()
  with pytest.raises(ValueError, match="depth 2"):
    task.flatten({"codes": jnp.zeros((1, 6, 2), jnp.int32), "label": jnp.zeros((1,))})


def test_ema_warmup_decay():
  assert float(trainer.ema_warmup_decay(0.999, 0)) == pytest.approx(0.1)
  assert float(trainer.ema_warmup_decay(0.999, 90)) == pytest.approx(0.91)
  assert float(trainer.ema_warmup_decay(0.999, 10 ** 6)) == pytest.approx(0.999)


def test_bfloat16_and_remat_options_train():
  task, _ = tiny_task()
  cfg = task.cfg
  cfg.model.dtype = "bfloat16"
  cfg.model.remat = True
  task = GeneratorTask(cfg, np.asarray(task.codebooks), 6, 3, 4)
  batch = token_batch()
  params, state = task.init(jax.random.key(0), batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # fp32 parameters
  loss, grads, _, _ = jax.jit(task.loss_and_grads)(params, state, task.constants(), batch,
                                                   jax.random.key(1), 0)
  assert np.isfinite(float(loss))
  assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
             for g in jax.tree.leaves(grads))


def test_paper_imagenet_generator_has_about_576m_parameters():
  config = config_base.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet.py"))
  depth = config.tokenizer.quantizer.depth
  books = np.zeros((1, 16, config.tokenizer.model.latent_dim), np.float32)  # shapes only
  task = GeneratorTask(config.generator, books, 64, depth, 1000)
  batch = {"codes": jax.ShapeDtypeStruct((2, 8, 8, depth), jnp.int32),
           "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
  params, _ = jax.eval_shape(lambda b: task.init(jax.random.key(0), b), batch)
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
  assert 0.9 * 576e6 < count < 1.1 * 576e6, count


def test_padded_positions_never_enter_the_loss():
  task, _ = tiny_task()
  batch = token_batch()
  valid = np.ones((8, 6), bool)
  valid[:, 4:] = False
  batch["valid_positions"] = jnp.asarray(valid)
  params, state = task.init(jax.random.key(0), batch)
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                        params)
  other = dict(batch, codes=batch["codes"].at[:, 4:].set(7))  # change only the padding
  losses = [task.losses(params, state, task.constants(), b, jax.random.key(2), False)
            for b in (batch, other)]
  assert float(losses[0][0]) == pytest.approx(float(losses[1][0]), rel=1e-6)
  for key in ("cls", "reg", "nll", "mask_ratio"):
    assert float(losses[0][1][key]) == pytest.approx(float(losses[1][1][key]), rel=1e-6)


def test_scanned_layers_compute_the_same_function_as_unrolled_ones():
  kw = dict(num_positions=6, token_depth=3, latent_dim=4, num_classes=4, width=32,
            num_layers=3, num_heads=2, mlp_ratio=2, num_components=4, low_rank=4)
  unrolled, scanned = ResGenTransformer(**kw), ResGenTransformer(**kw, scan_layers=True)
  rng = np.random.default_rng(0)
  args = (jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32),
          jnp.asarray(rng.integers(0, 4, (2, 6))), jnp.asarray([1, 4]))
  params = unrolled.init(jax.random.key(0), *args)["params"]
  # Non-zero adaLN gates, so the blocks change the output.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 if "modulation" in jax.tree_util.keystr(path) else x, params)
  blocks = [params.pop(f"block_{i}") for i in range(3)]
  stacked = dict(params, blocks={"block": jax.tree.map(lambda *x: jnp.stack(x), *blocks)})
  assert jax.tree.structure(stacked) == jax.tree.structure(
      scanned.init(jax.random.key(0), *args)["params"])
  expected = unrolled.apply({"params": dict(params, **{f"block_{i}": b
                                                      for i, b in enumerate(blocks)})}, *args)
  got = scanned.apply({"params": stacked}, *args)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert not np.allclose(expected[1], unrolled.apply(
      {"params": dict(params, **{f"block_{i}": jax.tree.map(jnp.zeros_like, b)
                                 for i, b in enumerate(blocks)})}, *args)[1])


def test_remat_policies_give_the_gradients_of_the_plain_model():
  task, _ = tiny_task()
  batch = token_batch()
  params, state = task.init(jax.random.key(0), batch)
  grads = {}
  for remat, policy in ((False, ""), (True, ""), (True, "dots_with_no_batch_dims_saveable")):
    cfg = task.cfg
    cfg.model.update(remat=remat, remat_policy=policy)
    variant = GeneratorTask(cfg, np.asarray(task.codebooks), 6, 3, 4)
    grads[policy, remat] = jax.jit(variant.loss_and_grads)(
        params, state, variant.constants(), batch, jax.random.key(1), 0)[1]
  for key, g in grads.items():
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads["", False])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(key))
  cfg.model.remat_policy = "save_everything_please"
  with pytest.raises(ValueError, match="unknown remat_policy 'save_everything_please'"):
    GeneratorTask(cfg, np.asarray(task.codebooks), 6, 3, 4)
