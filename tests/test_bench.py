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
