"""Frechet distance cost at FID's 2048 features: ours (symmetric eigendecompositions) against
the standard FID tools' ``trace(scipy.linalg.sqrtm(s1 @ s2))``.

    python -m bench.frechet [--features 2048] [--repeats 5] [--out bench/results]

For two feature sets of N = 64 (rank-deficient covariances, as in small evaluations) and
N = 4096 rows (full rank), it prints the median seconds of each route, their ratio, and how
far apart the two distances are (relative; at N = 64 that is the Schur square root's error:
ours equals the exact low-rank value, tests/test_evaluation.py). Host-side numpy, so the
numbers are the CPU's whatever the accelerator; results go to ``<out>/frechet_cpu.json``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import scipy.linalg

from bench.timing import median_seconds
from resgen_jax.evaluation import frechet
from resgen_jax.utils import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = (64, 4096)


def scipy_distance(mu1, sigma1, mu2, sigma2) -> float:
  """The standard FID tools' formula: ``tr sqrtm(s1 s2)`` by a Schur square root."""
  trace_root = np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_root)


def measure(rows: int, features: int, repeats: int) -> dict:
  rng = np.random.default_rng(rows)
  first = rng.normal(size=(rows, features))
  second = 0.5 * first + rng.normal(size=(rows, features)) + 0.1  # correlated, shifted
  stats = frechet.gaussian_stats(first) + frechet.gaussian_stats(second)
  ours, theirs = frechet.frechet_distance(*stats), scipy_distance(*stats)
  return {"rows": rows, "features": features,
          "ours_s": median_seconds(lambda: frechet.frechet_distance(*stats), repeats),
          "scipy_sqrtm_s": median_seconds(lambda: scipy_distance(*stats), repeats),
          "distance": ours, "relative_difference": abs(ours - theirs) / theirs}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--features", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  args = parser.parse_args()
  if args.features < 2 or args.repeats < 1:
    parser.error("--features must be >= 2 and --repeats >= 1")
  results = [measure(n, args.features, args.repeats) for n in ROWS]
  print(f"F = {args.features}, medians of {args.repeats}")
  print(f"{'N':>5} {'ours s':>8} {'scipy s':>8} {'speed-up':>9} {'rel. diff':>10}")
  for r in results:
    print(f"{r['rows']:>5} {r['ours_s']:>8.2f} {r['scipy_sqrtm_s']:>8.2f} "
          f"{r['scipy_sqrtm_s'] / r['ours_s']:>8.1f}x {r['relative_difference']:>10.2g}")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "frechet_cpu.json")
  files.save_json(path, {"repeats": args.repeats, "rows": results})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
