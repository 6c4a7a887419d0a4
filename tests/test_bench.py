"""The benchmark's FLOP counter against hand counts."""

import jax
import jax.numpy as jnp

from bench.train_throughput import dot_flops


def count(fn, *args):
  return dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def test_dot_flops_counts_matmuls_their_gradients_scans_and_conds():
  b, m, n, k = 4, 8, 16, 32
  x, w1, w2 = jnp.ones((b, m)), jnp.ones((m, n)), jnp.ones((n, k))
  mlp = lambda w1, w2, x: jnp.tanh(x @ w1) @ w2
  forward = 2 * b * m * n + 2 * b * n * k
  assert count(mlp, w1, w2, x) == forward
  # The backward pass of each layer costs two matmuls of its size (inputs and weights),
  # except that the first layer's input gradient is not needed.
  loss = lambda w1, w2, x: jnp.sum(mlp(w1, w2, x))
  assert count(jax.grad(loss, argnums=(0, 1)), w1, w2, x) == 3 * forward - 2 * b * m * n
  heads = jnp.ones((2, 3, 5, 7))  # batched matmul: 2 * batch dims * out dims * contraction
  assert count(lambda q: jnp.einsum("bhqd,bhkd->bhqk", q, q), heads) == 2 * 6 * 5 * 5 * 7
  steps = lambda x: jax.lax.scan(lambda c, _: (c @ jnp.ones((m, m)), None), x, None,
                                 length=6)[0]
  assert count(steps, x) == 6 * 2 * b * m * m
  branch = lambda p, x: jax.lax.cond(p, lambda x: x @ w1 @ jnp.ones((n, n)),
                                     lambda x: x @ w1, x)
  assert count(branch, True, x) == 2 * b * m * n + 2 * b * n * n


def test_compare_matches_parameter_counts_and_reads_its_targets():
  from bench import compare  # pylint: disable=g-import-not-at-top
  config = compare.digits_config()
  target = compare.parameter_count(compare.make_task(config, 16))
  for family in ("direct", "rq_transformer"):
    matched, count = compare.matched_config(config, family, 16, target)
    assert matched.generator.family == family
    assert count == compare.parameter_count(compare.make_task(matched, 16))
    assert abs(count - target) / target < 0.1, (family, count, target)
    for layers in (matched.generator.model.num_layers - 1, matched.generator.model.num_layers + 1):
      other = compare.parameter_count(compare.make_task(
          compare.family_config(config, family, layers), 16)) if layers >= 1 else None
      assert other is None or abs(other - target) >= abs(count - target)
  rows = [{"family": f, "depth": d, "seconds_per_image": t * (1 + d / 16),
           "peak_bytes_per_image": m}
          for f, t, m in (("resgen", 1.0, 10), ("direct", 1.5, 20), ("rq_transformer", 6.0, 10))
          for d in compare.DEPTHS]
  summary = compare.targets(rows)
  assert summary["rq_over_resgen_time"][16] == 6.0
  assert summary["resgen_d16_over_d4_time"] == 2.0 / 1.25
  assert summary["resgen_memory_at_or_below_baselines"]
