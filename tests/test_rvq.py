"""The RVQ math against slow, obvious numpy references on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resgen_jax.codec import rvq


def np_quantize(z, books, start=0, temperature=1.0):
  """Greedy residual quantization, one vector at a time. books: [D, V, d]; temperature:
  a scale of the distances in the log-probs, per vector or one for all."""
  depth = books.shape[0]
  flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
  starts = np.broadcast_to(np.asarray(start), z.shape[:-1]).reshape(-1)
  temps = np.broadcast_to(np.asarray(temperature, np.float64), z.shape[:-1]).reshape(-1)
  codes = np.full((len(flat), depth), rvq.UNUSED_CODE)
  residuals = np.zeros((len(flat), depth, z.shape[-1]))
  log_probs = np.zeros((len(flat), depth))
  for n, vec in enumerate(flat):
    r = vec.copy()
    for j in range(depth):
      residuals[n, j] = r
      if j < starts[n]:
        continue
      dist = ((r[None] - books[j]) ** 2).sum(-1)
      c = int(np.argmin(dist))
      codes[n, j] = c
      scaled = -dist / temps[n]
      log_probs[n, j] = scaled[c] - np.log(np.exp(scaled - scaled.max()).sum()) - scaled.max()
      r = r - books[j, c]
  shape = z.shape[:-1]
  return (codes.reshape(shape + (depth,)), residuals.reshape(shape + (depth, z.shape[-1])),
          log_probs.reshape(shape + (depth,)))


def np_embed_sum(codes, books, prefix):
  out = np.zeros(codes.shape[:-1] + (books.shape[-1],))
  for idx in np.ndindex(codes.shape[:-1]):
    p = prefix if np.isscalar(prefix) else prefix[idx]
    for j in range(p):
      if codes[idx + (j,)] != rvq.UNUSED_CODE:
        out[idx] += books[j, codes[idx + (j,)]]
  return out


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.mark.parametrize("shared", [False, True])
def test_quantize_matches_numpy(rng, shared):
  depth, size, dim = 5, 12, 6
  books = rng.normal(size=(1 if shared else depth, size, dim)).astype(np.float32)
  books_d = np.broadcast_to(books, (depth, size, dim))
  z = rng.normal(size=(3, 4, dim)).astype(np.float32) * 2
  q = rvq.quantize(jnp.asarray(z), jnp.asarray(books), depth=depth)
  codes, residuals, log_probs = np_quantize(z, books_d)
  np.testing.assert_array_equal(q.codes, codes)
  np.testing.assert_allclose(q.residuals, residuals, atol=1e-4)
  np.testing.assert_allclose(q.log_probs, log_probs, atol=1e-3)
  np.testing.assert_allclose(q.quantized, np_embed_sum(codes, books_d, depth), atol=1e-4)
  # The final residual is z minus the quantized vector, and quantization reduces error.
  errors = [np.linalg.norm(z - np_embed_sum(codes, books_d, p), axis=-1).mean()
            for p in range(depth + 1)]
  assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:]))


def test_dequantize_every_prefix_and_per_example_prefix(rng):
  depth, size, dim = 4, 9, 3
  books = rng.normal(size=(depth, size, dim)).astype(np.float32)
  codes = rng.integers(0, size, size=(6, 2, depth))
  for p in range(depth + 1):
    np.testing.assert_allclose(rvq.dequantize(jnp.asarray(codes), jnp.asarray(books), p),
                               np_embed_sum(codes, books, p), atol=1e-5)
  np.testing.assert_allclose(rvq.dequantize(jnp.asarray(codes), jnp.asarray(books)),
                             np_embed_sum(codes, books, depth), atol=1e-5)
  prefix = rng.integers(0, depth + 1, size=(6, 2))
  np.testing.assert_allclose(rvq.dequantize(jnp.asarray(codes), jnp.asarray(books), prefix),
                             np_embed_sum(codes, books, prefix), atol=1e-5)
  cumulative = rvq.cumulative_embeddings(jnp.asarray(codes), jnp.asarray(books))
  for j in range(depth):
    np.testing.assert_allclose(cumulative[..., j, :], np_embed_sum(codes, books, j + 1),
                               atol=1e-5)


def test_quantize_from_given_depth(rng):
  depth, size, dim = 6, 10, 4
  books = rng.normal(size=(depth, size, dim)).astype(np.float32)
  v = rng.normal(size=(8, dim)).astype(np.float32)
  for start in range(depth + 1):
    q = rvq.quantize(jnp.asarray(v), jnp.asarray(books), start_depth=start)
    codes, _, log_probs = np_quantize(v, books, start)
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_allclose(q.log_probs, log_probs, atol=1e-3)
    assert (np.asarray(q.codes)[:, :start] == rvq.UNUSED_CODE).all()
  starts = rng.integers(0, depth + 1, size=(8,))
  q = rvq.quantize(jnp.asarray(v), jnp.asarray(books), start_depth=jnp.asarray(starts))
  codes, _, _ = np_quantize(v, books, starts)
  np.testing.assert_array_equal(q.codes, codes)
  # The quantized vector is the sum of the embeddings of the depths it filled only.
  np.testing.assert_allclose(q.quantized, np_embed_sum(codes, books, depth), atol=1e-4)


def test_quantize_log_probs_at_a_temperature_per_vector(rng):
  depth, size, dim = 4, 12, 3
  books = rng.normal(size=(depth, size, dim)).astype(np.float32)
  v = rng.normal(size=(2, 5, dim)).astype(np.float32)
  temps = rng.uniform(0.05, 3.0, size=(2, 5)).astype(np.float32)
  starts = rng.integers(0, depth, size=(2, 5))
  q = rvq.quantize(jnp.asarray(v), jnp.asarray(books), start_depth=jnp.asarray(starts),
                   temperature=jnp.asarray(temps))
  codes, _, log_probs = np_quantize(v, books, starts, temps)
  np.testing.assert_array_equal(q.codes, codes)  # the codes never depend on the scale
  np.testing.assert_allclose(q.log_probs, log_probs, rtol=1e-4, atol=1e-4)
  # A scalar temperature is the same as that value everywhere.
  q2 = rvq.quantize(jnp.asarray(v), jnp.asarray(books), temperature=0.5)
  np.testing.assert_allclose(q2.log_probs, np_quantize(v, books, 0, 0.5)[2], rtol=1e-4,
                             atol=1e-4)


def test_embed_treats_unused_code_as_zero(rng):
  books = rng.normal(size=(3, 5, 2)).astype(np.float32)
  codes = np.array([[rvq.UNUSED_CODE, 4, rvq.UNUSED_CODE]])
  out = np.asarray(rvq.embed(jnp.asarray(codes), jnp.asarray(books)))
  np.testing.assert_array_equal(out[0, 0], 0)
  np.testing.assert_array_equal(out[0, 2], 0)
  np.testing.assert_allclose(out[0, 1], books[1, 4])


def test_codebook_shape_errors(rng):
  with pytest.raises(ValueError, match="expected 1 \\(shared\\) or depth=4"):
    rvq.quantize(jnp.zeros((2, 3)), jnp.zeros((3, 5, 3)), depth=4)
  with pytest.raises(ValueError, match="width 2 but codebooks have width 3"):
    rvq.quantize(jnp.zeros((2, 2)), jnp.zeros((3, 5, 3)))


@pytest.mark.parametrize("num_books", [1, 3])
def test_batch_statistics_match_numpy(rng, num_books):
  n, depth, size, dim = 20, 3, 4, 2
  residuals = rng.normal(size=(n, depth, dim)).astype(np.float32)
  codes = rng.integers(0, size, size=(n, depth))
  mask = rng.random((n, depth)) < 0.7
  counts, sums = rvq.batch_statistics(jnp.asarray(residuals), jnp.asarray(codes),
                                      jnp.asarray(mask), num_books, size)
  ref_counts = np.zeros((depth, size))
  ref_sums = np.zeros((depth, size, dim))
  for i in range(n):
    for j in range(depth):
      if mask[i, j]:
        ref_counts[j, codes[i, j]] += 1
        ref_sums[j, codes[i, j]] += residuals[i, j]
  if num_books == 1:
    ref_counts, ref_sums = ref_counts.sum(0, keepdims=True), ref_sums.sum(0, keepdims=True)
  np.testing.assert_allclose(counts, ref_counts)
  np.testing.assert_allclose(sums, ref_sums, atol=1e-5)


def test_ema_update_constructed_case():
  # One book, two codes in 1-D. Code 0 starts at 0 with count 1; code 1 at 10 with count 1.
  # The batch puts vectors 2 and 4 on code 0 and nothing on code 1; with decay 0.5:
  #   size = [0.5*1 + 0.5*2, 0.5*1 + 0] = [1.5, 0.5]
  #   sum  = [0.5*0 + 0.5*6, 0.5*10 + 0] = [3, 5]  ->  codebook = [2, 10] (eps = 0).
  state = rvq.CodebookState.create(jnp.array([[[0.0], [10.0]]]))
  residuals = jnp.array([[[2.0]], [[4.0]]])  # [N=2, D=1, d=1]
  codes = jnp.array([[0], [0]])
  counts, sums = rvq.batch_statistics(residuals, codes, jnp.ones((2, 1), bool), 1, 2)
  new = rvq.ema_update(state, counts, sums, decay=0.5, eps=0.0)
  np.testing.assert_allclose(new.cluster_size, [[1.5, 0.5]])
  np.testing.assert_allclose(new.embed_sum, [[[3.0], [5.0]]])
  np.testing.assert_allclose(new.codebooks, [[[2.0], [10.0]]])


def test_dead_code_restart_resets_statistics():
  state = rvq.CodebookState(
      codebooks=jnp.array([[[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]]),
      cluster_size=jnp.array([[3.0, 0.01, 2.0]]),
      embed_sum=jnp.array([[[0.0, 0.0], [0.01, 0.01], [10.0, 10.0]]]))
  # The only valid candidate is (7, -7); the others are masked out.
  candidates = jnp.array([[[9.0, 9.0]], [[7.0, -7.0]], [[8.0, 8.0]]])  # [N=3, C=1, d=2]
  mask = jnp.array([[False], [True], [False]])
  new, dead = rvq.restart_dead_codes(state, candidates, mask, threshold=0.1,
                                     rng=jax.random.key(0))
  assert int(dead[0]) == 1
  np.testing.assert_allclose(new.codebooks, [[[0, 0], [7, -7], [5, 5]]])
  np.testing.assert_allclose(new.cluster_size, [[3.0, rvq.RESTART_CLUSTER_SIZE, 2.0]])
  np.testing.assert_allclose(new.embed_sum, [[[0, 0], [7, -7], [10, 10]]])
  # The next EMA update with no use of the restarted code keeps it where it was restarted.
  counts, sums = jnp.zeros((1, 3)), jnp.zeros((1, 3, 2))
  after = rvq.ema_update(new, counts, sums, decay=0.9, eps=0.0)
  np.testing.assert_allclose(after.codebooks[0, 1], [7, -7], atol=1e-5)
  # Threshold 0 disables restarts.
  same, dead = rvq.restart_dead_codes(state, candidates, mask, 0.0, jax.random.key(0))
  np.testing.assert_array_equal(same.codebooks, state.codebooks)
  assert int(dead[0]) == 0


def test_kmeans_recovers_separated_clusters(rng):
  centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  x = np.concatenate([c + 0.1 * rng.normal(size=(50, 2)) for c in centers])
  found = np.asarray(rvq.kmeans(jnp.asarray(x), 3, 20, jax.random.key(3)))
  # Each true center has a centroid within 0.1 (k-means may permute them).
  dist = np.linalg.norm(found[:, None] - centers[None], axis=-1)
  assert np.sort(dist.min(0)).max() < 0.1, found


def test_kmeans_codebooks_shapes_and_residual_fit(rng):
  z = jnp.asarray(rng.normal(size=(200, 4)).astype(np.float32))
  books = rvq.kmeans_codebooks(z, depth=3, codebook_size=8, shared=False, num_iters=5,
                               rng=jax.random.key(0))
  assert books.shape == (3, 8, 4)
  shared = rvq.kmeans_codebooks(z, depth=3, codebook_size=8, shared=True, num_iters=5,
                                rng=jax.random.key(0))
  assert shared.shape == (1, 8, 4)
  # Each added depth of data-fitted books lowers the quantization error of that data.
  codes = rvq.quantize(z, books).codes
  errs = [float(jnp.mean(jnp.sum((z - rvq.dequantize(codes, books, p)) ** 2, -1)))
          for p in range(4)]
  assert errs[0] > errs[1] > errs[2] > errs[3]


def test_code_usage_metrics(rng):
  codes = np.array([[0, 1], [0, 2], [1, 2], [3, 2]])
  mask = np.array([[True, True], [True, True], [True, False], [True, True]])
  m = rvq.code_usage_metrics(jnp.asarray(codes), jnp.asarray(mask), 4)
  # depth 1 uses codes {0: 2, 1: 1, 3: 1}; depth 2 (valid) uses {1: 1, 2: 2}.
  np.testing.assert_allclose(m["usage"], [3 / 4, 2 / 4])
  p1, p2 = np.array([.5, .25, .25]), np.array([1 / 3, 2 / 3])
  np.testing.assert_allclose(m["perplexity"], [np.exp(-(p1 * np.log(p1)).sum()),
                                               np.exp(-(p2 * np.log(p2)).sum())], rtol=1e-5)


def test_restart_picks_are_distinct_valid_candidates():
  valid = jnp.asarray(np.random.default_rng(0).random((3, 40)) < 0.5)
  picks = np.asarray(rvq.restart_picks(jax.random.key(1), valid, 10))
  for book in range(3):
    assert len(set(picks[book])) == 10  # enough valid candidates: no duplicates
    assert np.asarray(valid)[book, picks[book]].all()
  few = jnp.zeros((1, 40), bool).at[0, 5].set(True).at[0, 9].set(True)
  picks = np.asarray(rvq.restart_picks(jax.random.key(2), few, 10))
  assert set(picks[0]) <= {5, 9} and set(picks[0]) == {5, 9}


def test_shared_codebook_needs_the_depth():
  with pytest.raises(ValueError, match="shared codebook"):
    rvq.quantize(jnp.zeros((2, 3)), jnp.zeros((1, 5, 3)))
