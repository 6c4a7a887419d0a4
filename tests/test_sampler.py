"""The ResGen sampler with fake networks: call counts, schedule, prefix property, never
re-hiding, ties, known tokens, guidance, and an oracle that recovers the data exactly."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental import io_callback

from resgen_jax.codec import rvq
from resgen_jax.generator import masking, sampler

pytestmark = pytest.mark.usefixtures("quick_compile")

B, L, K = 2, 5, 3


def sampler_cfg(**kw):
  cfg = ml_collections.ConfigDict(dict(
      steps=6, schedule="cosine", cfg_scale=1.0, cfg_ramp="constant", temperature=1.0,
      top_p=1.0, top_k=0, confidence_temperature=1.0, mean_noise=0.0,
      confidence="codebook", guide_means=True, confidence_depths="each", sigma_noise=0.0))
  cfg.update(kw)
  return cfg


def cube_codebooks(depth, ratio=0.25):
  """Depth j's codes are the 8 corners of a cube of half-side ratio**j: the tail of any
  code sum is shorter than half the distance between two codes of the depth before, so
  greedy re-quantization of a tail sum from any start depth recovers its codes exactly."""
  corners = np.array(list(itertools.product([-1.0, 1.0], repeat=3)), np.float32)
  return jnp.asarray(np.stack([corners * ratio ** j for j in range(depth)]))


class Recorder:
  """A fake network that records, at run time, every call's inputs."""

  def __init__(self, depth, dim=3, seed=0):
    self.calls = []
    self.rng = np.random.default_rng(seed)
    self.depth, self.dim = depth, dim

  def _record(self, codes, hidden, conditional):
    self.calls.append((np.asarray(codes), np.asarray(hidden), bool(conditional)))
    return (self.rng.normal(size=(B, L, K)).astype(np.float32),
            self.rng.normal(size=(B, L, K, self.dim)).astype(np.float32))

  def __call__(self, codes, hidden, conditional):
    shapes = (jax.ShapeDtypeStruct((B, L, K), jnp.float32),
              jax.ShapeDtypeStruct((B, L, K, self.dim), jnp.float32))
    return io_callback(self._record, shapes, codes, hidden, conditional, ordered=True)


def run(network, depth, cfg, known=None, codes=None, seed=0):
  books = cube_codebooks(depth)
  known = jnp.zeros((B, L, depth), bool) if known is None else known
  codes = jnp.zeros((B, L, depth), jnp.int32) if codes is None else codes
  fn = jax.jit(lambda c, k, r: sampler.sample(network, books, c, k, r, cfg))
  return fn(codes, known, jax.random.key(seed))


def expected_hidden(steps, total, gamma):
  """n_t after each step t = 1..T, the numpy twin of the schedule rule."""
  out, before = [], total
  for t in range(1, steps + 1):
    n = 0 if t == steps else max(min(int(np.floor(gamma(t / steps) * total)), before - 1), 0)
    out.append(n)
    before = n
  return out


@pytest.mark.parametrize("depth", [4, 8, 16])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_calls_schedule_prefix_and_never_rehiding(depth, cfg_scale):
  cfg = sampler_cfg(cfg_scale=cfg_scale)
  net = Recorder(depth)
  out = run(net, depth, cfg)
  jax.block_until_ready(out)
  # Exactly T network calls, 2T with guidance, whatever the depth.
  assert len(net.calls) == cfg.steps * (2 if cfg_scale != 1.0 else 1)
  if cfg_scale != 1.0:
    assert [c[2] for c in net.calls] == [True, False] * cfg.steps

  reveal = np.asarray(out.reveal_step)
  codes = np.asarray(out.codes)
  assert (reveal >= 1).all() and (reveal <= cfg.steps).all()  # all revealed at the end
  assert codes.min() >= 0 and codes.max() < 8
  gamma = lambda r: float(np.cos(np.pi * r / 2))
  schedule = expected_hidden(cfg.steps, L * depth, gamma)
  conditional_calls = [c for c in net.calls if c[2]]
  for t in range(1, cfg.steps + 1):
    visible = reveal <= t
    # Revealed counts follow the schedule.
    assert (np.sum(~visible, axis=(1, 2)) == schedule[t - 1]).all(), t
    # Visible tokens form a depth prefix at every position after every step.
    assert not (visible[..., 1:] & ~visible[..., :-1]).any(), t
    # What the network saw at step t + 1: the visible tokens, never changed afterwards.
    if t < cfg.steps:
      seen_codes, seen_hidden = conditional_calls[t][:2]
      np.testing.assert_array_equal(seen_hidden, np.sum(~visible, axis=-1))
      np.testing.assert_array_equal(seen_codes[visible], codes[visible])


def test_known_tokens_are_never_changed_and_padding_stays():
  depth = 4
  rng = np.random.default_rng(1)
  codes = jnp.asarray(rng.integers(0, 8, (B, L, depth)), jnp.int32)
  prefix = rng.integers(0, depth + 1, (B, L))
  prefix[0, -1] = depth  # a fully known position (like padding or a prompt frame)
  known = jnp.asarray(np.arange(depth) < prefix[..., None])
  out = run(Recorder(depth), depth, sampler_cfg(), known=known, codes=codes)
  known_np = np.asarray(known)
  np.testing.assert_array_equal(np.asarray(out.codes)[known_np], np.asarray(codes)[known_np])
  assert (np.asarray(out.reveal_step)[known_np] == sampler.KNOWN_STEP).all()
  assert (np.asarray(out.reveal_step)[~known_np] >= 1).all()
  with pytest.raises(ValueError, match="prefix of depths"):
    bad = known_np.copy()
    bad[0, 0] = [False, True, False, False]
    sampler.sample(Recorder(depth), cube_codebooks(depth), codes, jnp.asarray(bad),
                   jax.random.key(0), sampler_cfg())


def oracle(data_codes, books, uncond_offset=None, cfg_scale=1.0):
  """A network whose one-component mixture mean is the true hidden sum of ``data_codes``.

  With ``uncond_offset``, the conditional mean is ``target + delta`` and the unconditional
  one ``target + delta * w / (w - 1)``, so only correctly guided means give the target.
  """
  emb = rvq.embed(data_codes, books)

  def network(codes, hidden, conditional):
    _, target = masking.split_embeddings(emb, hidden)
    logits = jnp.zeros(target.shape[:2] + (1,))
    if uncond_offset is None:
      return logits, target[..., None, :]
    delta = uncond_offset
    if conditional:
      return logits, (target + delta)[..., None, :]
    return logits, (target + delta * cfg_scale / (cfg_scale - 1.0))[..., None, :]

  return network


@pytest.mark.parametrize("depth", [4, 8])
def test_oracle_network_reproduces_the_data_tokens(depth):
  books = cube_codebooks(depth)
  data = jnp.asarray(np.random.default_rng(2).integers(0, 8, (B, L, depth)), jnp.int32)
  # Precondition: greedy re-quantization of every tail sum recovers the tail codes.
  for k in range(depth + 1):
    hidden = jnp.full((B, L), k)
    _, tail = masking.split_embeddings(rvq.embed(data, books), hidden)
    q = rvq.quantize(tail, books, start_depth=depth - k)
    np.testing.assert_array_equal(np.asarray(q.codes)[..., depth - k:],
                                  np.asarray(data)[..., depth - k:])
  for cfg in (sampler_cfg(), sampler_cfg(steps=1), sampler_cfg(steps=3, top_p=0.5,
                                                                 confidence_temperature=5.0)):
    out = run(oracle(data, books), depth, cfg)
    np.testing.assert_array_equal(out.codes, data)


@pytest.mark.parametrize("confidence_depths", sampler.CONFIDENCE_DEPTHS)
def test_a_latent_oracle_with_trained_like_codebooks_recovers_the_latent(confidence_depths):
  """With k-means codebooks (as a trained tokenizer has), greedy re-quantization does not
  give back the data's tokens, so the exact-token oracle above does not apply. A network
  that predicts the rest of the data's latent given what is visible must still end, for
  any T and either confidence rule, at the latent one greedy quantization of it gives:
  within the tokenizer's own quantization error of the data."""
  depth, size, dim = 8, 16, 4
  pool = jnp.asarray(np.random.default_rng(0).normal(size=(4000, dim)), jnp.float32)
  books = rvq.kmeans_codebooks(pool, depth, size, False, 10, jax.random.key(0))
  z = jnp.asarray(np.random.default_rng(1).normal(size=(B, L, dim)), jnp.float32)
  data = rvq.quantize(z, books).codes
  latent = rvq.dequantize(data, books)
  requantized = rvq.dequantize(rvq.quantize(latent, books).codes, books)

  def latent_oracle(codes, hidden, conditional):
    visible, _ = masking.split_embeddings(rvq.embed(codes, books), hidden)
    return jnp.zeros(hidden.shape + (1,)), (latent - visible)[..., None, :]

  quantization_error = float(jnp.mean(jnp.sum(jnp.square(z - latent), -1)))
  for steps in (1, 3, 8):
    cfg = sampler_cfg(steps=steps, confidence_depths=confidence_depths)
    out = jax.jit(lambda c, k, r: sampler.sample(latent_oracle, books, c, k, r, cfg))(
        jnp.zeros_like(data), jnp.zeros(data.shape, bool), jax.random.key(steps))
    sampled = rvq.dequantize(out.codes, books)
    error = float(jnp.mean(jnp.sum(jnp.square(sampled - latent), -1)))
    assert error <= quantization_error
    np.testing.assert_allclose(sampled, requantized, atol=1e-4)
  assert not np.array_equal(out.codes, data)  # the tokens differ; the latent does not


def test_guidance_combines_logits_and_means_as_specified():
  depth, w = 4, 2.5
  books = cube_codebooks(depth)
  data = jnp.asarray(np.random.default_rng(3).integers(0, 8, (B, L, depth)), jnp.int32)
  delta = jnp.asarray(np.random.default_rng(4).normal(size=(3,)), jnp.float32)
  for ramp in sampler.CFG_RAMPS:
    net = oracle(data, books, uncond_offset=delta, cfg_scale=w)
    cfg = sampler_cfg(cfg_scale=w)
    out = run(net, depth, cfg)
    np.testing.assert_array_equal(out.codes, data)
  # Conditional-only (scale 1) sampling with that network sees target + delta: not the data.
  out = run(oracle(data, books, uncond_offset=delta * 3, cfg_scale=w), depth, sampler_cfg())
  assert not np.array_equal(out.codes, data)


def test_guidance_of_the_logits_only_keeps_the_conditional_means():
  """guide_means=False: logits are guided, the means are the conditional call's."""
  w = 3.0
  cond = (jnp.asarray([[1.0, 2.0]]), jnp.asarray([[[0.5], [1.5]]]))
  uncond = (jnp.asarray([[0.0, 4.0]]), jnp.asarray([[[2.0], [-1.0]]]))
  network = lambda x, conditional: cond if conditional else uncond
  cfg = sampler_cfg(cfg_scale=w)
  logits, means = sampler.guided(network, cfg, 1, None, conditional_only=(1,))
  np.testing.assert_allclose(logits, uncond[0] + w * (cond[0] - uncond[0]))
  np.testing.assert_allclose(means, cond[1])
  both = sampler.guided(network, cfg, 1, None)
  np.testing.assert_allclose(both[1], uncond[1] + w * (cond[1] - uncond[1]))


def test_mixture_confidence_scores_candidates_under_the_models_sigma():
  """confidence="mixture": the candidates' log-probs are a softmax over codes of
  -||r - e||^2 / (2 sigma^2) with each position's sigma (numpy), the tokens unchanged."""
  depth = 3
  books = jnp.asarray(np.random.default_rng(5).normal(size=(depth, 8, 3)), jnp.float32)
  rng = np.random.default_rng(6)
  means = jnp.asarray(rng.normal(size=(B, L, 1, 3)), jnp.float32)
  network = lambda codes, hidden, conditional: (jnp.zeros((B, L, 1)), means)
  hidden = jnp.asarray(rng.integers(1, depth + 1, (B, L)), jnp.int32)
  sigma = lambda h: 0.1 * h.astype(jnp.float32)
  codes = jnp.zeros((B, L, depth), jnp.int32)
  base = sampler.mixture_proposal(network, books, sampler_cfg())(codes, hidden, 1,
                                                                 jax.random.key(0))
  scaled = sampler.mixture_proposal(network, books, sampler_cfg(confidence="mixture"),
                                    sigma_fn=sigma)(codes, hidden, 1, jax.random.key(0))
  np.testing.assert_array_equal(base[0], scaled[0])
  b, i = 1, 2
  r = np.asarray(means[b, i, 0], np.float64)
  s2 = 2 * (0.1 * int(hidden[b, i])) ** 2
  for j in range(depth - int(hidden[b, i]), depth):
    dist = ((r[None] - np.asarray(books[j])) ** 2).sum(-1)
    c = int(np.argmin(dist))
    assert int(scaled[0][b, i, j]) == c
    log_p = -dist[c] / s2 - np.log(np.exp(-dist / s2).sum())
    np.testing.assert_allclose(scaled[1][b, i, j], log_p, rtol=1e-3, atol=1e-3)
    r = r - np.asarray(books[j, c])
  with pytest.raises(ValueError, match="need the model's sigma"):
    sampler.mixture_proposal(network, books, sampler_cfg(confidence="mixture"))


@pytest.mark.parametrize("depth", [4, 8])
def test_first_depth_confidence_reveals_positions_whole(depth):
  """confidence_depths="first": a step reveals whole positions but for at most one, where
  its count ends (so after step t at most t positions are partly revealed; with "each" the
  random network leaves far more); the schedule is the same."""
  cfg = sampler_cfg(steps=5, confidence_depths="first")
  step = np.asarray(run(Recorder(depth), depth, cfg).reveal_step)
  each = np.asarray(run(Recorder(depth), depth, sampler_cfg(steps=5)).reveal_step)
  partial = lambda s, t: (((s <= t).sum(-1) > 0) & ((s <= t).sum(-1) < depth)).sum(-1)
  for t in range(1, cfg.steps + 1):
    assert (partial(step, t) <= t).all(), (t, step)
  assert partial(each, 2).sum() > partial(step, 2).sum()
  hidden = [(step > t).sum(axis=(1, 2)) for t in range(1, cfg.steps + 1)]
  expected = expected_hidden(cfg.steps, L * depth, masking.schedule("cosine"))
  np.testing.assert_array_equal(np.stack(hidden, -1), [expected] * B)


def test_noise_on_the_chosen_mean_has_the_given_std_per_position():
  rng = jax.random.key(0)
  means = jnp.zeros((1, 2, 1, 4000))
  std = jnp.asarray([[0.1, 2.0]])
  chosen = np.asarray(sampler.choose_means(rng, jnp.zeros((1, 2, 1)), means, 1.0, 1.0, std))
  np.testing.assert_allclose(chosen.std(-1), [[0.1, 2.0]], rtol=0.05)
  np.testing.assert_array_equal(sampler.choose_means(rng, jnp.zeros((1, 2, 1)), means, 1.0,
                                                     1.0, 0.0), 0.0)


def test_ties_are_broken_deterministically_by_position_then_depth():
  depth = 3
  # Every position predicts the same mean, so every candidate has the same score; with no
  # Gumbel noise the reveal order must be position-major, depth-minor.
  def flat_network(codes, hidden, conditional):
    return jnp.zeros((B, L, 1)), jnp.zeros((B, L, 1, 3))
  cfg = sampler_cfg(steps=L * depth, schedule="linear", confidence_temperature=0.0)
  a = run(flat_network, depth, cfg)
  b = run(flat_network, depth, cfg, seed=7)
  np.testing.assert_array_equal(a.reveal_step, b.reveal_step)
  expected = np.arange(1, L * depth + 1).reshape(L, depth)
  np.testing.assert_array_equal(np.asarray(a.reveal_step)[0], expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(sampler.top_p_logits(logits, 0.7)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = np.isfinite(np.asarray(sampler.top_p_logits(logits, 0.1)))
  np.testing.assert_array_equal(kept, [[True, False, False, False]])
  assert np.isfinite(np.asarray(sampler.top_p_logits(logits, 1.0))).all()


def test_bad_sampler_config_values():
  for top_p in (0.0, 1.5):
    with pytest.raises(ValueError, match="top_p must be in"):
      run(Recorder(4), 4, sampler_cfg(top_p=top_p))
  with pytest.raises(ValueError, match="steps must be >= 1"):
    run(Recorder(4), 4, sampler_cfg(steps=0))
  with pytest.raises(ValueError, match="unknown mask schedule"):
    run(Recorder(4), 4, sampler_cfg(schedule="exp"))
  with pytest.raises(ValueError, match="cfg_ramp"):
    run(Recorder(4), 4, sampler_cfg(cfg_scale=2.0, cfg_ramp="cosine"))
  with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
    run(Recorder(4), 4, sampler_cfg(cfg_scale=-1.0))
  with pytest.raises(ValueError, match="sampler.confidence must be one of"):
    run(Recorder(4), 4, sampler_cfg(confidence="entropy"))
  with pytest.raises(ValueError, match="sampler.confidence_depths must be one of"):
    run(Recorder(4), 4, sampler_cfg(confidence_depths="sum"))
  with pytest.raises(ValueError, match="sigma_noise must be >= 0"):
    run(Recorder(4), 4, sampler_cfg(sigma_noise=-1.0))
  with pytest.raises(ValueError, match="sampler.dtype must be one of"):
    run(Recorder(4), 4, sampler_cfg(dtype="float16"))


def test_schedule_table_is_exact_at_and_near_integers():
  cosine = masking.schedule("cosine")
  table = sampler.schedule_table(cosine, 6, 20)
  assert table[3, 20] == 10  # cos(pi/3) * 20 = 10 exactly; float32 gives 9.9999995
  assert sampler.schedule_table(masking.schedule("linear"), 15, 15)[11, 15] == 3  # not 2
  # Values just below an integer stay below it (6.99976 -> 6, 108.9995 -> 108).
  assert sampler.schedule_table(cosine, 43, 64)[39, 64] == 6
  assert sampler.schedule_table(cosine, 25, 256)[17, 256] == 108
  table = sampler.schedule_table(cosine, 5, 30)
  assert (table[-1] == 0).all()
  counts = np.vstack([np.arange(31), table])  # hidden before step 1, then after each step
  step = np.diff(counts, axis=0)
  assert (step <= 0).all()
  assert (step[counts[:-1] > 0] <= -1).all()  # every step reveals at least one while any hide


def test_non_prefix_known_mask_under_jit_is_cut_to_its_prefix():
  depth = 4
  codes = jnp.full((B, L, depth), 5, jnp.int32)
  known = np.zeros((B, L, depth), bool)
  known[0, 0] = [True, False, True, True]
  out = jax.jit(lambda c, k: sampler.sample(Recorder(depth), cube_codebooks(depth), c, k,
                                            jax.random.key(0), sampler_cfg()))(
                                                codes, jnp.asarray(known))
  got = np.asarray(out.codes)
  assert got[0, 0, 0] == 5 and (got >= 0).all()  # the prefix kept, the rest generated
  assert np.asarray(out.reveal_step)[0, 0, 0] == sampler.KNOWN_STEP
  assert (np.asarray(out.reveal_step)[0, 0, 1:] >= 1).all()


def test_reveal_keeps_the_best_slots_as_a_stable_sort_would():
  rng = np.random.default_rng(3)
  b, length, depth = 6, 7, 4
  # Few distinct values (many ties), both zeros, infinities and negatives.
  values = np.array([-np.inf, -3.5, -1.0, -0.0, 0.0, 0.25, 2.0, np.inf], np.float32)
  scores = values[rng.integers(0, len(values), (b, length, depth))]
  scores[:2] = rng.normal(size=(2, length, depth)) * 1e-30  # tiny values of both signs
  keep = rng.integers(0, length * depth + 1, b)
  keep[:2] = (0, length * depth)
  got = np.asarray(sampler.reveal(jnp.asarray(scores), jnp.asarray(keep, jnp.int32)))
  for i in range(b):
    flat = scores[i].reshape(-1) + 0.0  # -0.0 and 0.0 are equal scores
    order = np.argsort(-flat, kind="stable")
    expected = np.zeros(flat.shape, bool)
    expected[order[:length * depth - keep[i]]] = True
    np.testing.assert_array_equal(got[i].reshape(-1), expected, err_msg=f"row {i}")
