"""Timing shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of ``fn()`` (blocked until ready) over ``repeats`` calls, after one
  untimed call that compiles and warms up."""
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)
