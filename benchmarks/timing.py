"""Round-robin timing shared by the benchmarks: medians of interleaved repeats."""

import statistics
import time


def median_seconds(candidates, warmup=2, repeats=7):
  """Median wall time of each zero-argument callable, measured round-robin.

  Interleaving the candidates makes a busy machine slow all of them alike, so
  the ratios stay meaningful even when absolute times do not.
  """
  for fn in candidates.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, fn in candidates.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}
