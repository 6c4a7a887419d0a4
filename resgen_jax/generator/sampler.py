"""The reverse process: iterative unmasking of RVQ tokens in T steps (method.md section 5).

One jitted computation, a ``lax.scan`` over steps ``t = 1..T``. Each step costs one network
call (two with classifier-free guidance) plus cheap quantization, whatever the depth D:

  1. the network gives, per position, a mixture over the sum of its hidden embeddings
     (CFG: ``l = l_u + w (l_c - l_u)``, ``mu = mu_u + w (mu_c - mu_u)``);
  2. a component is drawn (temperature, top-p), its mean (optionally plus noise) is
     residual-quantized with the codebooks of the position's hidden depths only ->
     candidate tokens and a log-probability per candidate;
  3. ``n_t = floor(gamma(t/T) * H_0)`` tokens stay hidden (``H_0``: hidden at the start),
     at least one is revealed per step and none stays hidden after step T;
  4. scores = log-prob + Gumbel noise * ``tau (1 - t/T)``, made non-increasing along depth
     by a cumulative minimum, so the best-scoring set always extends each position's
     visible depth prefix; exactly the best ones are revealed (ties go to the lower
     position, then the coarser depth; a radix select, no sort). Revealed tokens never
     change again.

The network is a closure ``network_fn(codes [B,L,D], hidden [B,L], conditional: bool) ->
(logits [B,L,K], means [B,L,K,d])``, so the loop can be tested with a fake model. (A trained
ResGen returns its low-rank mean rows ``[B,L,K,r]`` instead and the proposal maps only the
drawn component's row to ``d``: ``mixture_proposal(project_fn=...)``.)

Steps 1-2 are the *proposal*; :func:`unmask` runs steps 3-4 around any proposal, so the
direct-token baseline (a softmax per hidden depth, :func:`token_proposal`) is sampled with
exactly the same schedule and confidence rule as ResGen (:func:`mixture_proposal`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resgen_jax.codec import rvq
from resgen_jax.generator import masking

Array = jax.Array
KNOWN_STEP = 0  # reveal_step of tokens known from the start (prompt, padding)
# gamma(t/T) * h is often an exact integer in exact arithmetic (cos(pi/3) * 20 = 10,
# (1 - 12/15) * 15 = 3) but lands just below it even in float64 (2.9999999999999996).
# Float64 errors are ~1e-16, so this tolerance rounds only those up, never a genuine
# value such as 6.99976.
INTEGER_TOLERANCE = 1e-9
CFG_RAMPS = ("constant", "linear")
# What a candidate token's confidence is (ResGen; the method leaves the scale open):
# "codebook": log-softmax over codes of the raw negative squared distances (temperature 1 in
# embedding units); "mixture": the same under the model's own Gaussian, distances over
# 2 sigma_k^2 with sigma_k the trained mixture sigma of the position's hidden count k in
# embedding units, so fine depths (tiny residuals) are scored on their own scale.
CONFIDENCES = ("codebook", "mixture")
# Which confidence ranks a position's hidden tokens: "each" token its own (then a cumulative
# minimum along depth), or "first": every hidden token of a position gets the confidence of
# its first hidden token, so positions are revealed whole (all their depths from one
# proposal, a schedule over positions in effect) except where a step's count ends mid-way.
CONFIDENCE_DEPTHS = ("each", "first")
# The network's compute dtype while sampling ("": the dtype it was trained with).
SAMPLING_DTYPES = ("", "float32", "bfloat16")


@flax.struct.dataclass
class LoopState:
  codes: Array  # int32 [B, L, D]; entries at hidden slots are not meaningful
  hidden: Array  # int32 [B, L]: hidden count k_i (the top k_i depths are hidden)
  reveal_step: Array  # int32 [B, L, D]: step 1..T that revealed the token; 0 if known
  rng: Array


class SampleOutput(NamedTuple):
  codes: Array  # int32 [B, L, D], every token revealed
  reveal_step: Array  # int32 [B, L, D], the per-step history (0 = known from the start)


def guidance_scale(cfg_scale: float, ramp: str, t: Array, steps: int) -> Array:
  """CFG weight at step t (1-based): constant, or linear from 1 at t=0 to cfg_scale at T."""
  if ramp == "constant":
    return jnp.asarray(cfg_scale, jnp.float32)
  if ramp == "linear":
    return 1.0 + (cfg_scale - 1.0) * t / steps
  raise ValueError(f"unknown cfg_ramp {ramp!r}; known: {CFG_RAMPS}")


def top_p_logits(logits: Array, top_p: float) -> Array:
  """Keeps the smallest set of entries whose probability reaches ``top_p`` (the most
  probable one always); the rest get -inf. logits ``[..., K]``."""
  if top_p >= 1.0:
    return logits
  probs = jax.nn.softmax(logits, axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
  keep = jnp.zeros_like(keep_sorted).at[
      tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def top_k_logits(logits: Array, top_k: int) -> Array:
  """Keeps the ``top_k`` largest entries of ``[..., K]`` (ties at the k-th value kept too);
  the rest get -inf. ``top_k`` 0 (or >= K) keeps all."""
  if top_k <= 0 or top_k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def filter_logits(logits: Array, temperature: float, top_k: int, top_p: float) -> Array:
  """The distribution tokens are drawn from: ``logits / temperature``, then top-k, then
  top-p (``temperature > 0``)."""
  return top_p_logits(top_k_logits(logits / temperature, top_k), top_p)


def draw_tokens(rng: Array, logits: Array, temperature: float, top_k: int,
                top_p: float) -> Array:
  """One token per row of logits ``[..., V]`` -> int32 ``[...]``: drawn from
  :func:`filter_logits`, or the argmax at ``temperature == 0``."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(
      rng, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def check_settings(cfg: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first sampler setting out of range."""
  if cfg.steps < 1:
    raise ValueError(f"sampler.steps must be >= 1, got {cfg.steps}")
  if not 0.0 < cfg.top_p <= 1.0:
    raise ValueError(f"sampler.top_p must be in (0, 1], got {cfg.top_p}")
  if cfg.top_k < 0:
    raise ValueError(f"sampler.top_k must be >= 0 (0: off), got {cfg.top_k}")
  if cfg.temperature < 0:
    raise ValueError(f"sampler.temperature must be >= 0, got {cfg.temperature}")
  if cfg.cfg_scale < 0:
    raise ValueError(f"sampler.cfg_scale must be >= 0 (1: no guidance), got {cfg.cfg_scale}")
  if cfg.confidence not in CONFIDENCES:
    raise ValueError(f"sampler.confidence must be one of {CONFIDENCES}, got "
                     f"{cfg.confidence!r}")
  if cfg.confidence_depths not in CONFIDENCE_DEPTHS:
    raise ValueError(f"sampler.confidence_depths must be one of {CONFIDENCE_DEPTHS}, got "
                     f"{cfg.confidence_depths!r}")
  if cfg.mean_noise < 0 or cfg.sigma_noise < 0:
    raise ValueError(f"sampler.mean_noise and sampler.sigma_noise must be >= 0, got "
                     f"{cfg.mean_noise} and {cfg.sigma_noise}")
  if cfg.get("dtype", "") not in SAMPLING_DTYPES:
    raise ValueError(f"sampler.dtype must be one of {SAMPLING_DTYPES} ('' = the trained "
                     f"dtype), got {cfg.dtype!r}")
  guidance_scale(cfg.cfg_scale, cfg.cfg_ramp, 0, cfg.steps)  # validates the ramp


def guided(network_fn: Callable, cfg: ml_collections.ConfigDict, t: Array, *inputs,
           conditional_only=()):
  """The network's outputs at step ``t`` with classifier-free guidance: every output array
  ``o`` becomes ``o_u + w (o_c - o_u)`` (one call without guidance, ``cfg_scale == 1``),
  except the outputs at the indices ``conditional_only``, which are the conditional ones."""
  conditional = network_fn(*inputs, True)
  if cfg.cfg_scale == 1.0:
    return conditional
  unconditional = network_fn(*inputs, False)
  w = guidance_scale(cfg.cfg_scale, cfg.cfg_ramp, t, cfg.steps)
  mix = lambda c, u: jax.tree.map(lambda a, b: b + w * (a - b), c, u)
  if not conditional_only:
    return mix(conditional, unconditional)
  return tuple(c if i in conditional_only else mix(c, u)
               for i, (c, u) in enumerate(zip(conditional, unconditional)))


def choose_means(rng: Array, logits: Array, means: Array, temperature: float, top_p: float,
                 noise_std, project: Optional[Callable] = None) -> Array:
  """Draws one component per position and returns its mean (plus optional Gaussian noise of
  std ``noise_std``, a float or one value per position ``[B, L]``).

  logits ``[B, L, K]``, means ``[B, L, K, d]`` -> ``[B, L, d]``. ``temperature == 0``
  takes the most probable component. With ``project`` (``[B, L, r] -> [B, L, d]``),
  ``means`` are rows ``[B, L, K, r]`` and only the chosen one is projected.
  """
  comp_key, noise_key = jax.random.split(rng)
  if temperature > 0:
    component = jax.random.categorical(comp_key, top_p_logits(logits / temperature, top_p))
  else:
    component = jnp.argmax(logits, axis=-1)
  chosen = jnp.take_along_axis(means, component[..., None, None], axis=-2)[..., 0, :]
  if project is not None:
    chosen = project(chosen)
  if not (isinstance(noise_std, (int, float)) and noise_std == 0):
    noise_std = jnp.asarray(noise_std, jnp.float32)[..., None]
    chosen = chosen + noise_std * jax.random.normal(noise_key, chosen.shape)
  return chosen


def schedule_table(gamma: Callable, steps: int, max_total: int) -> np.ndarray:
  """How many tokens stay hidden after each step for every possible starting count.

  ``table[t - 1, h] = floor(gamma(t / T) * h)``, computed in float64 on the host (see
  INTEGER_TOLERANCE), at least one fewer than after the previous step, and 0 after step T.
  -> int32 ``[T, max_total + 1]``.
  """
  totals = np.arange(max_total + 1)
  table = np.zeros((steps, max_total + 1), np.int32)
  before = totals
  for t in range(1, steps + 1):
    scheduled = np.floor(gamma(np.float64(t) / steps, np) * totals
                         + INTEGER_TOLERANCE).astype(np.int64)
    after = np.zeros_like(totals) if t == steps else np.maximum(
        np.minimum(scheduled, before - 1), 0)
    table[t - 1], before = after, after
  return table


def sortable_keys(x: Array) -> Array:
  """float32 -> uint32 keys in the same order (``-inf < .. < -0.0 == 0.0 < .. < +inf``):
  negative floats have every bit flipped, the others only the sign bit."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def nth_largest(keys: Array, n: Array) -> Array:
  """The ``n``-th largest key of each row, bit by bit from the top (a radix select: 32
  counting passes over the row, no sort). keys uint32 ``[B, N]``, n int ``[B]`` in 1..N
  -> uint32 ``[B]`` (all bits set when ``n == 0``)."""
  bits = jnp.left_shift(jnp.uint32(1), jnp.arange(31, -1, -1, dtype=jnp.uint32))

  def add_bit(value, bit):
    candidate = value | bit
    enough = jnp.sum(keys >= candidate[:, None], axis=-1) >= n
    return jnp.where(enough, candidate, value), None

  value, _ = jax.lax.scan(add_bit, jnp.zeros(keys.shape[:1], jnp.uint32), bits)
  return value


def reveal(scores: Array, keep_hidden: Array) -> Array:
  """Exactly which slots are visible after the step.

  Args:
    scores: ``[B, L, D]``, +inf at already visible slots, non-increasing along depth.
    keep_hidden: ``[B]`` how many slots stay hidden.
  Returns:
    bool ``[B, L, D]``: the ``L*D - keep_hidden`` best slots; among equal scores the lower
    flat index (position, then depth) first, as a stable sort would order them. Found by
    :func:`nth_largest`, which costs O(L*D) per row where a sort costs O(L*D log(L*D)).
  """
  b, length, depth = scores.shape
  keys = sortable_keys(scores.reshape(b, -1))
  count = length * depth - keep_hidden  # [B] slots visible after the step
  threshold = nth_largest(keys, count)[:, None]
  above, tied = keys > threshold, keys == threshold
  room = count - jnp.sum(above, axis=-1)  # tied slots still to reveal, in index order
  visible = above | (tied & (jnp.cumsum(tied, axis=-1) <= room[:, None]))
  return visible.reshape(b, length, depth)


def known_prefix(known: Array) -> Array:
  """Known tokens must be a depth prefix at every position (what stays hidden is a top run
  of depths). A concrete mask that is not raises a ValueError; under tracing the mask is
  cut to its prefix (tokens after the first unknown depth are generated)."""
  if not isinstance(known, jax.core.Tracer):
    concrete = np.asarray(known)
    if np.any(concrete[..., 1:] & ~concrete[..., :-1]):
      raise ValueError("known tokens must be a prefix of depths at every position "
                       "(a known token cannot follow a hidden one at the same position)")
  return jnp.cumprod(known.astype(jnp.int32), axis=-1).astype(bool)


def mixture_proposal(network_fn: Callable, codebooks: Array, cfg: ml_collections.ConfigDict,
                     sigma_fn: Optional[Callable] = None,
                     project_fn: Optional[Callable] = None) -> Callable:
  """ResGen's proposal (steps 1-2): ``(codes, hidden, t, rng) -> (candidates [B,L,D],
  log_probs [B,L,D])``; candidates at a position's hidden depths come from quantizing one
  drawn mixture mean with those depths' codebooks. With CFG the means are guided too unless
  ``cfg.guide_means`` is False (then only the component logits are). ``sigma_fn(hidden
  [B,L]) -> [B,L]``, the mixture sigma in embedding units, is what the ``mixture``
  confidence and ``sigma_noise`` (noise in units of that sigma; 1 draws from the chosen
  component's Gaussian instead of taking its mean) need.

  ``project_fn(rows [B,L,r], hidden [B,L]) -> means [B,L,d]``: when given, the network's
  second output is each component's mean before an affine map (ResGen's low-rank rows) and
  only the drawn component's row is mapped, so no ``[B, L, K, d]`` tensor is made (the map
  is affine, so guiding rows is guiding means)."""
  if (cfg.confidence == "mixture" or cfg.sigma_noise > 0) and sigma_fn is None:
    raise ValueError("sampler.confidence='mixture' and sampler.sigma_noise > 0 need the "
                     "model's sigma (sigma_fn)")

  def propose(codes, hidden, t, rng):
    logits, means = guided(network_fn, cfg, t, codes, hidden,
                           conditional_only=() if cfg.guide_means else (1,))
    noise = cfg.mean_noise
    if cfg.sigma_noise > 0:
      noise = noise + cfg.sigma_noise * sigma_fn(hidden)
    project = None if project_fn is None else (lambda rows: project_fn(rows, hidden))
    mean = choose_means(rng, logits, means, cfg.temperature, cfg.top_p, noise, project)
    depth = codes.shape[-1]
    temperature = 1.0 if cfg.confidence == "codebook" else 2.0 * jnp.square(sigma_fn(hidden))
    candidates = rvq.quantize(mean, codebooks, depth=depth, start_depth=depth - hidden,
                              temperature=temperature)
    return candidates.codes, candidates.log_probs

  return propose


def token_proposal(network_fn: Callable, cfg: ml_collections.ConfigDict) -> Callable:
  """The direct-token baseline's proposal: ``network_fn(codes, hidden, conditional) ->
  logits [B,L,D,V]``, a softmax per depth; every hidden token is drawn independently
  (temperature, top-k, top-p; argmax at temperature 0) and its confidence is its log
  probability under the model (before temperature and filtering), as in MaskGIT."""

  def propose(codes, hidden, t, rng):
    logits = guided(network_fn, cfg, t, codes, hidden)
    tokens = draw_tokens(rng, logits, cfg.temperature, cfg.top_k, cfg.top_p)
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)
    return tokens, log_probs[..., 0]

  return propose


def sample(network_fn: Callable, codebooks: Array, codes: Array, known: Array, rng: Array,
           cfg: ml_collections.ConfigDict) -> SampleOutput:
  """ResGen sampling: :func:`unmask` with :func:`mixture_proposal`.

  Args:
    network_fn: ``(codes, hidden, conditional) -> (logits, means)``, see the module doc.
    codebooks: ``[C, V, d]`` tokenizer codebooks.
    codes, known, rng, cfg: see :func:`unmask`.
  """
  return unmask(mixture_proposal(network_fn, codebooks, cfg), codes, known, rng, cfg)


def unmask(propose: Callable, codes: Array, known: Array, rng: Array,
           cfg: ml_collections.ConfigDict) -> SampleOutput:
  """Fills every unknown token in ``cfg.steps`` steps (steps 3-4 of the module doc).

  Args:
    propose: ``(codes [B,L,D], hidden [B,L], t, rng) -> (candidates int [B,L,D],
      log_probs [B,L,D])``, a token and its confidence for every slot (only hidden slots'
      values are used).
    codes: int32 ``[B, L, D]`` starting grid; only entries where ``known`` are read.
    known: bool ``[B, L, D]`` tokens given by the caller (prompt, inpainting context,
      padding); a depth prefix at each position. They are never changed.
    rng: PRNG key.
    cfg: sampler config: ``steps``, ``schedule``, ``cfg_scale``, ``cfg_ramp``,
      ``temperature``, ``top_k``, ``top_p``, ``confidence_temperature``, ``mean_noise``
      (std of the noise added to the chosen mean), ``confidence_depths``, and for ResGen
      ``confidence``, ``sigma_noise`` and ``guide_means``.

  Returns:
    :class:`SampleOutput`.
  """
  known = known_prefix(known)
  check_settings(cfg)
  _, length, depth = codes.shape
  table = jnp.asarray(schedule_table(masking.schedule(cfg.schedule), cfg.steps,
                                     length * depth))
  hidden0 = jnp.sum(~known, axis=-1).astype(jnp.int32)
  initial_total = jnp.sum(hidden0, axis=-1)  # [B]

  def step(state: LoopState, t):
    rng, choice_key, gumbel_key = jax.random.split(state.rng, 3)
    candidates, log_probs = propose(state.codes, state.hidden, t, choice_key)
    hidden_slots = masking.hidden_mask(state.hidden, depth)
    tau = cfg.confidence_temperature * (1.0 - t / cfg.steps)
    noisy = log_probs + tau * jax.random.gumbel(gumbel_key, hidden_slots.shape)
    if cfg.confidence_depths == "first":  # the first hidden token's, for the whole position
      first = jnp.minimum(depth - state.hidden, depth - 1)[..., None]
      noisy = jnp.broadcast_to(jnp.take_along_axis(noisy, first, axis=-1), noisy.shape)
    scores = jax.lax.cummin(jnp.where(hidden_slots, noisy, jnp.inf), axis=2)
    visible = reveal(scores, table[t - 1, initial_total])
    revealed = visible & hidden_slots
    new = LoopState(codes=jnp.where(revealed, candidates, state.codes),
                    hidden=jnp.sum(~visible, axis=-1).astype(jnp.int32),
                    reveal_step=jnp.where(revealed, t, state.reveal_step), rng=rng)
    return new, None

  init = LoopState(codes=jnp.where(known, codes, rvq.UNUSED_CODE).astype(jnp.int32),
                   hidden=hidden0, reveal_step=jnp.full(codes.shape, KNOWN_STEP, jnp.int32),
                   rng=rng)
  final, _ = jax.lax.scan(step, init, jnp.arange(1, cfg.steps + 1))
  return SampleOutput(codes=final.codes, reveal_step=final.reveal_step)
