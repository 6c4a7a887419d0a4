"""Residual vector quantization (RVQ): pure functions, no Flax.

Notation (method.md section 1): a latent ``z`` of width ``d`` is quantized in ``D`` stages,

    r_0 = z;  x_j = argmin_c ||r_{j-1} - e_j(c)||^2;  r_j = r_{j-1} - e_j(x_j)   (j = 1..D)
    z_hat = sum_j e_j(x_j)

Codebooks are always passed as an array ``[C, V, d]`` where ``C == D`` (one book per depth)
or ``C == 1`` (one book shared by every depth); :func:`books_for_depth` broadcasts the shared
case so every function below sees ``[D, V, d]``.

Codes are int32 ``[..., D]``. A partial quantization (:func:`quantize` with ``start_depth``)
leaves the depths it did not fill at :data:`UNUSED_CODE`; every function here treats that id
as "no embedding" explicitly and never uses it as an index.

The codebook training state (EMA statistics, dead-code restart, k-means initialisation) is a
pytree, :class:`CodebookState`, updated by pure functions so the statistics are computed on
the global batch inside one jitted step.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

# Marks a depth that a partial quantization did not fill. Negative ids are never used as
# indices (jnp.take would silently wrap or clip them); see `embed`.
UNUSED_CODE = -1

# EMA count given to a freshly (re)initialised code: "seen once". With the default dead-code
# threshold of 0.1 and EMA decay 0.99 a restarted code that is never chosen again survives
# log(0.1) / log(0.99) ~ 229 steps before it is restarted once more.
RESTART_CLUSTER_SIZE = 1.0


def books_for_depth(codebooks: Array, depth: int) -> Array:
  """Returns ``[D, V, d]`` codebooks from per-depth ``[D, V, d]`` or shared ``[1, V, d]``."""
  if codebooks.ndim != 3:
    raise ValueError(f"codebooks must be [C, V, d], got shape {codebooks.shape}")
  num_books = codebooks.shape[0]
  if num_books == depth:
    return codebooks
  if num_books == 1:
    return jnp.broadcast_to(codebooks, (depth,) + codebooks.shape[1:])
  raise ValueError(
      f"codebooks have {num_books} books; expected 1 (shared) or depth={depth} (per depth)")


def prefix_codebooks(codebooks, depth: int):
  """The books of the first ``depth`` depths: per-depth books ``[D, V, d]`` are cut to
  ``[depth, V, d]``; a shared book ``[1, V, d]`` serves every depth as it is (what a
  generator of a depth prefix of the codes, ``generator.token_depth``, works with)."""
  return codebooks if codebooks.shape[0] == 1 else codebooks[:depth]


def squared_distances(x: Array, codebook: Array) -> Array:
  """``||x - e_v||^2`` for every code. x: ``[..., d]``, codebook ``[V, d]`` -> ``[..., V]``."""
  x = x.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  cross = jnp.einsum("...d,vd->...v", x, codebook, precision=jax.lax.Precision.HIGHEST)
  return (jnp.sum(x * x, axis=-1, keepdims=True) - 2.0 * cross
          + jnp.sum(codebook * codebook, axis=-1))


def first_argmax(x: Array) -> Array:
  """``argmax`` over the last axis (the first index on ties) as two plain reductions.

  Same result as ``jnp.argmax``; XLA lowers argmax to a variadic reduce that is several
  times slower on CPU, and quantization runs it D times per sampler step.
  """
  best = jnp.max(x, axis=-1, keepdims=True)
  size = x.shape[-1]
  return jnp.min(jnp.where(x == best, jnp.arange(size, dtype=jnp.int32), size), axis=-1)


class Quantized(NamedTuple):
  """Result of :func:`quantize`.

  Attributes:
    codes: int32 ``[..., D]``; :data:`UNUSED_CODE` at depths before ``start_depth``.
    residuals: ``[..., D, d]``, the residual *entering* each depth (``r_{j-1}``); at unfilled
      depths it is the input vector unchanged.
    log_probs: ``[..., D]``, log-softmax over codes of ``-||r_{j-1} - e_j(c)||^2 / temperature``
      at the chosen code (the per-token confidence ResGen's sampler uses); 0 at unfilled depths.
    quantized: ``[..., d]``, the sum of the chosen embeddings over the filled depths.
  """
  codes: Array
  residuals: Array
  log_probs: Array
  quantized: Array


def quantize(z: Array, codebooks: Array, depth: Optional[int] = None,
             start_depth: Union[int, Array] = 0, temperature: float = 1.0) -> Quantized:
  """Residual-quantizes ``z`` greedily, depth by depth.

  Args:
    z: ``[..., d]`` vectors.
    codebooks: ``[C, V, d]`` (C = D, or 1 for a shared book).
    depth: D; defaults to ``codebooks.shape[0]`` (must be given for a shared book with D > 1).
    start_depth: 0-based first depth to fill: an int, or an int array broadcastable to
      ``z.shape[:-1]`` (one start per vector). ResGen re-quantizes a predicted sum of hidden
      embeddings with the codebooks of the hidden depths only, i.e. ``start_depth = D - k``.
    temperature: scale of the distances in ``log_probs``: a float, or an array
      broadcastable to ``z.shape[:-1]`` (one scale per vector, e.g. ``2 sigma^2`` of a
      Gaussian around each).

  Returns:
    :class:`Quantized`.
  """
  if depth is None:
    if codebooks.shape[0] == 1:
      raise ValueError("a shared codebook ([1, V, d]) needs the depth D to quantize to")
    depth = codebooks.shape[0]
  books = books_for_depth(codebooks, depth)
  if z.shape[-1] != books.shape[-1]:
    raise ValueError(f"z has width {z.shape[-1]} but codebooks have width {books.shape[-1]}")
  batch_shape = z.shape[:-1]
  start = jnp.broadcast_to(jnp.asarray(start_depth, jnp.int32), batch_shape)
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), batch_shape)[..., None]

  def step(residual, inputs):
    j, book = inputs
    # -||r - e||^2 up to the per-row constant ||r||^2, which neither the argmin nor the
    # log-softmax over codes depends on.
    logits = 2.0 * jnp.einsum("...d,vd->...v", residual, book,
                              precision=jax.lax.Precision.HIGHEST) - jnp.sum(book * book, -1)
    code = first_argmax(logits)
    scaled = logits / temperature
    log_prob = (jnp.take_along_axis(scaled, code[..., None], axis=-1)[..., 0]
                - jax.nn.logsumexp(scaled, axis=-1))
    active = j >= start
    embedding = jnp.where(active[..., None], book[code], 0.0)
    out = (jnp.where(active, code, UNUSED_CODE), residual, jnp.where(active, log_prob, 0.0))
    return residual - embedding, out

  z = z.astype(jnp.float32)
  final, (codes, residuals, log_probs) = jax.lax.scan(
      step, z, (jnp.arange(depth), books), unroll=True)
  move = lambda x, extra: jnp.moveaxis(x, 0, x.ndim - 1 - extra)
  return Quantized(codes=move(codes, 0), residuals=move(residuals, 1),
                   log_probs=move(log_probs, 0), quantized=z - final)


def embed(codes: Array, codebooks: Array) -> Array:
  """Per-depth embeddings ``e_j(x_j)``. codes ``[..., D]`` -> ``[..., D, d]``.

  :data:`UNUSED_CODE` entries embed to zero vectors.
  """
  depth = codes.shape[-1]
  books = books_for_depth(codebooks, depth)
  valid = codes != UNUSED_CODE
  safe = jnp.where(valid, codes, 0)
  # books[j, safe[..., j]] for every depth j.
  gathered = books[jnp.arange(depth), safe]
  return jnp.where(valid[..., None], gathered, 0.0)


def depth_mask(depth: int, prefix: Union[None, int, Array], batch_shape=()) -> Array:
  """Boolean ``[..., D]`` mask that is True for the first ``prefix`` depths.

  ``prefix`` is None (all depths), an int, or an int array broadcastable to ``batch_shape``.
  """
  prefix = depth if prefix is None else prefix
  prefix = jnp.broadcast_to(jnp.asarray(prefix, jnp.int32), tuple(batch_shape))
  return jnp.arange(depth) < prefix[..., None]


def dequantize(codes: Array, codebooks: Array,
               prefix: Union[None, int, Array] = None) -> Array:
  """Sum of the embeddings of the first ``prefix`` depths. codes ``[..., D]`` -> ``[..., d]``.

  ``prefix`` may be None (all D depths), an int, or an int array over ``codes.shape[:-1]``
  (per-example depth, as quantizer dropout needs).
  """
  mask = depth_mask(codes.shape[-1], prefix, codes.shape[:-1])
  return jnp.sum(jnp.where(mask[..., None], embed(codes, codebooks), 0.0), axis=-2)


def cumulative_embeddings(codes: Array, codebooks: Array) -> Array:
  """``out[..., j, :] = sum_{j' <= j} e_j'(x_j')``. codes ``[..., D]`` -> ``[..., D, d]``."""
  return jnp.cumsum(embed(codes, codebooks), axis=-2)


# ----------------------------------------------------------------------------------------
# Codebook training: EMA statistics, dead-code restart, k-means initialisation.
# ----------------------------------------------------------------------------------------


@flax.struct.dataclass
class CodebookState:
  """Codebooks and their EMA statistics. C = D (per depth) or 1 (shared).

  Attributes:
    codebooks: ``[C, V, d]``.
    cluster_size: ``[C, V]`` EMA of how many batch vectors chose each code.
    embed_sum: ``[C, V, d]`` EMA of the sum of the residuals that chose each code.
  """
  codebooks: Array
  cluster_size: Array
  embed_sum: Array

  @classmethod
  def create(cls, codebooks: Array) -> "CodebookState":
    """Wraps initial codebooks; every code counts as seen once (RESTART_CLUSTER_SIZE)."""
    size = jnp.full(codebooks.shape[:2], RESTART_CLUSTER_SIZE, jnp.float32)
    return cls(codebooks=codebooks.astype(jnp.float32), cluster_size=size,
               embed_sum=codebooks.astype(jnp.float32) * RESTART_CLUSTER_SIZE)


def _scatter_indices(codes: Array, mask: Array):
  """(depth index, code index, weight) ``[N, D]`` each, for scatter-adds into ``[D, V]``.
  Scatter-adds, not one-hots: an ``[N, D, V]`` one-hot is gigabytes at the paper's size."""
  rows = jnp.broadcast_to(jnp.arange(codes.shape[1]), codes.shape)
  return rows, jnp.where(mask, codes, 0), mask.astype(jnp.float32)


def code_counts(codes: Array, mask: Array, codebook_size: int) -> Array:
  """How often each code was chosen at each depth. codes, mask ``[N, D]`` -> ``[D, V]``."""
  rows, safe, weight = _scatter_indices(codes, mask)
  return jnp.zeros((codes.shape[1], codebook_size), jnp.float32).at[rows, safe].add(weight)


def batch_statistics(residuals: Array, codes: Array, mask: Array, num_books: int,
                     codebook_size: int):
  """Per-book code counts and residual sums over a (global) batch.

  Args:
    residuals: ``[N, D, d]`` residual entering each depth.
    codes: ``[N, D]`` chosen codes.
    mask: ``[N, D]`` bool, which (vector, depth) pairs take part (quantizer dropout).
    num_books: C (D or 1).
    codebook_size: V.

  Returns:
    counts ``[C, V]`` and sums ``[C, V, d]``.
  """
  rows, safe, weight = _scatter_indices(codes, mask)
  counts = code_counts(codes, mask, codebook_size)
  sums = jnp.zeros((codes.shape[1], codebook_size, residuals.shape[-1]), jnp.float32).at[
      rows, safe].add(residuals.astype(jnp.float32) * weight[..., None])
  if num_books == 1:
    counts, sums = counts.sum(0, keepdims=True), sums.sum(0, keepdims=True)
  return counts, sums


def ema_update(state: CodebookState, counts: Array, sums: Array, decay: float,
               eps: float = 1e-5) -> CodebookState:
  """Exponential-moving-average codebook update (van den Oord et al. 2017, appendix).

  ``cluster_size <- decay * cluster_size + (1 - decay) * counts`` (same for ``embed_sum``);
  the codebook is ``embed_sum / cluster_size`` with Laplace smoothing ``eps`` so a code with
  a vanishing count never divides by zero.
  """
  size = decay * state.cluster_size + (1.0 - decay) * counts
  embed_sum = decay * state.embed_sum + (1.0 - decay) * sums
  total = jnp.sum(size, axis=-1, keepdims=True)
  smoothed = (size + eps) / (total + size.shape[-1] * eps) * total
  return CodebookState(codebooks=embed_sum / smoothed[..., None], cluster_size=size,
                       embed_sum=embed_sum)


def restart_dead_codes(state: CodebookState, candidates: Array, candidate_mask: Array,
                       threshold: float, rng: Array):
  """Replaces codes whose EMA count fell below ``threshold`` with random batch residuals.

  The restarted code's EMA statistics are reset in the same step (count
  RESTART_CLUSTER_SIZE, sum = the new vector times that count), so the next EMA update does
  not pull it back towards its stale average.

  Args:
    state: the codebook state (after this step's EMA update).
    candidates: ``[N, C, d]`` residual vectors each book may restart from (for a shared
      book, C = 1 and N pools every depth).
    candidate_mask: ``[N, C]`` bool, which candidates are valid.
    threshold: codes with ``cluster_size < threshold`` are dead. ``threshold <= 0`` disables.
    rng: PRNG key.

  Returns:
    ``(new_state, num_dead [C])``.
  """
  dead = state.cluster_size < threshold  # [C, V]
  num_books, codebook_size = dead.shape
  any_valid = jnp.any(candidate_mask, axis=0)  # [C]
  picks = restart_picks(rng, candidate_mask.T, codebook_size)  # [C, V]
  new = jnp.take_along_axis(jnp.swapaxes(candidates, 0, 1), picks[..., None], axis=1)
  replace = dead & any_valid[:, None]
  new_state = CodebookState(
      codebooks=jnp.where(replace[..., None], new, state.codebooks),
      cluster_size=jnp.where(replace, RESTART_CLUSTER_SIZE, state.cluster_size),
      embed_sum=jnp.where(replace[..., None], new * RESTART_CLUSTER_SIZE, state.embed_sum))
  return new_state, jnp.sum(dead, axis=-1)


def restart_picks(rng: Array, valid: Array, count: int) -> Array:
  """``count`` candidate indices per book, distinct while there are enough valid ones.

  Gumbel top-k draws valid candidates uniformly without replacement, so restarted codes do
  not start as copies of each other; when a book has fewer valid candidates than
  ``count``, the rest are drawn with replacement. valid: bool ``[C, N]`` -> ``[C, count]``.
  """
  order_key, extra_key = jax.random.split(rng)
  logits = jnp.where(valid, 0.0, -jnp.inf)
  extra = jax.random.categorical(extra_key, logits[:, None, :], axis=-1,
                                 shape=(valid.shape[0], count))
  if valid.shape[1] < count:
    return extra
  scores = jax.random.gumbel(order_key, valid.shape) + logits
  top_scores, top = jax.lax.top_k(scores, count)
  return jnp.where(jnp.isfinite(top_scores), top, extra)


def kmeans(x: Array, num_clusters: int, num_iters: int, rng: Array,
           weights: Optional[Array] = None) -> Array:
  """Lloyd's k-means. x ``[N, d]`` -> centroids ``[num_clusters, d]``.

  Centroids start at random (weighted) data points, drawn with replacement so
  ``num_clusters > N`` works; an empty cluster keeps its previous centroid.
  """
  x = x.astype(jnp.float32)
  weights = jnp.ones(x.shape[:1], jnp.float32) if weights is None else weights.astype(
      jnp.float32)
  logits = jnp.where(weights > 0, 0.0, -jnp.inf)
  centroids = x[jax.random.categorical(rng, logits, shape=(num_clusters,))]

  def step(centroids, _):
    assign = jnp.argmin(squared_distances(x, centroids), axis=-1)
    onehot = jax.nn.one_hot(assign, num_clusters, dtype=jnp.float32) * weights[:, None]
    counts = onehot.sum(0)
    sums = jnp.einsum("nk,nd->kd", onehot, x, precision=jax.lax.Precision.HIGHEST)
    updated = sums / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, updated, centroids), None

  centroids, _ = jax.lax.scan(step, centroids, None, length=num_iters)
  return centroids


def kmeans_codebooks(z: Array, depth: int, codebook_size: int, shared: bool,
                     num_iters: int, rng: Array) -> Array:
  """k-means initial codebooks from data, depth by depth (RQ-VAE style).

  Per-depth books: book j is k-means of the residuals left by books ``1..j-1``. A shared
  book: the same residual pass, then one k-means over the residuals of every depth pooled.

  Args:
    z: ``[N, d]`` encoder outputs.
  Returns:
    ``[D, V, d]`` or ``[1, V, d]`` codebooks.
  """
  keys = jax.random.split(rng, depth + 1)
  residual = z.astype(jnp.float32)
  books, pooled = [], []
  for j in range(depth):
    book = kmeans(residual, codebook_size, num_iters, keys[j])
    pooled.append(residual)
    code = jnp.argmin(squared_distances(residual, book), axis=-1)
    residual = residual - book[code]
    books.append(book)
  if shared:
    return kmeans(jnp.concatenate(pooled, 0), codebook_size, num_iters, keys[-1])[None]
  return jnp.stack(books)


def code_usage_metrics(codes: Array, mask: Array, codebook_size: int) -> dict:
  """Per-depth utilisation (fraction of codes used) and perplexity of a batch of codes.

  Args:
    codes: ``[N, D]``; mask: ``[N, D]`` bool.
  Returns:
    ``{"usage": [D], "perplexity": [D]}``.
  """
  return usage_from_counts(code_counts(codes, mask, codebook_size))


def usage_from_counts(counts: Array, xp=jnp) -> dict:
  """Code counts ``[D, V]`` -> ``{"usage": [D], "perplexity": [D]}``: the fraction of codes
  used and ``exp(entropy)`` of their frequencies, per depth. ``xp`` is jax.numpy in traced
  code, numpy for float64 counts accumulated on the host."""
  probs = counts / xp.maximum(counts.sum(-1, keepdims=True), 1.0)
  entropy = -xp.sum(xp.where(probs > 0, probs * xp.log(xp.where(probs > 0, probs, 1.0)),
                             0.0), axis=-1)
  return {"usage": xp.mean(counts > 0, axis=-1), "perplexity": xp.exp(entropy)}
