"""The benchmark's FLOP counter against hand counts."""

import jax
import jax.numpy as jnp

from bench.train_throughput import model_flops


def count(fn, *args):
  return model_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def test_model_flops_counts_matmuls_their_gradients_scans_and_conds():
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


def test_model_flops_counts_convolutions_grouped_strided_and_their_gradients():
  """Against hand counts: 2 x output elements x window x input features per group."""
  x, w = jnp.ones((2, 9, 9, 4)), jnp.ones((3, 3, 4, 6))
  conv = lambda w, x, stride, groups=1: jax.lax.conv_general_dilated(
      x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)
  forward = 2 * (2 * 9 * 9 * 6) * (3 * 3 * 4)
  assert count(lambda w, x: conv(w, x, 1), w, x) == forward
  assert count(lambda w, x: conv(w, x, 2), w, x) == 2 * (2 * 5 * 5 * 6) * (3 * 3 * 4)
  grouped = jnp.ones((3, 3, 2, 6))  # 2 groups of 2 input features
  assert count(lambda w, x: conv(w, x, 1, 2), grouped, x) == 2 * (2 * 9 * 9 * 6) * (3 * 3 * 2)
  # Kernel and input gradients: each a convolution of the forward pass's cost.
  loss = lambda w, x: jnp.sum(conv(w, x, 1))
  assert count(jax.grad(loss, argnums=(0, 1)), w, x) == 3 * forward


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
