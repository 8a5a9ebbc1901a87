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


def interleaved_seconds(candidates, warmup=0, repeats=3):
  """Every wall time of each zero-argument callable, in rounds run back to back.

  For long runs (whole jobs) where each repeat counts: round `r` runs the
  candidates in turn, in reverse order every other round, so that neither
  always runs first (after the other's page cache, or before a neighbour's
  job starts). Compare the candidates with `round_ratios`.

  Returns:
    {name: [seconds of round 0, round 1, ...]}.
  """
  names = list(candidates)
  for _ in range(warmup):
    for name in names:
      candidates[name]()
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      candidates[name]()
      times[name].append(time.perf_counter() - start)
  return times


def round_ratios(times, numerator, denominator):
  """Per-round ratios `times[numerator][r] / times[denominator][r]` and their median."""
  ratios = [a / b for a, b in zip(times[numerator], times[denominator])]
  return ratios, statistics.median(ratios)
