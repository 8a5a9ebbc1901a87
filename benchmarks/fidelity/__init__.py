"""Fidelity checks: every algorithm against an independent reference on the same weights and data.

A check computes the toolkit's result (`ours`) on random weights, data and
masks, and the same quantity by a reference written independently of the
toolkit: NumPy in this process (`reference`), or PyTorch, delve or
torchattacks in a peer process (`peer`, "module:function" under
`benchmarks/peers/`, run with the peers' own folder on its path, never in
this environment). Both sides see the same arrays: `ours` returns
`(inputs, outputs)` and the reference maps `inputs` to arrays with the keys
of `outputs`. The check agrees when the largest absolute difference over
all keys is at most `tolerance` (or, for the few checks that say so in
their name, a quantile over examples of one key: `quantile_difference`).

Each module of this package adds its checks to a module-level `CHECKS`
list; `checks()` collects them all. `python -m benchmarks.check_fidelity`
runs them and prints the table; the checks whose reference needs no peer
package also run in the test suite (`tests/benchmarks/test_fidelity.py`).
"""

import dataclasses
import importlib
import pkgutil
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

Arrays = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Context:
  """What a check may use: the data folder (None in the tests: synthetic data only) and a seed."""
  data_dir: Optional[str] = None
  seed: int = 0
  # The peer folder's packages are available (set by the runner); a check may skip its
  # real-data variant when data_dir is None, never its comparison.


@dataclasses.dataclass(frozen=True)
class Check:
  """One algorithm compared with one reference.

  Attributes:
    name: the algorithm and setting, e.g. "SSAM-F unstructured, random 50 % mask".
    reference: what it is compared with, e.g. "PyTorch re-derivation of Mi-Peng's first_step".
    tolerance: the largest absolute difference allowed.
    ours: context -> (inputs, outputs): the toolkit's computation; `inputs` are every array
      the reference needs (weights, data, masks, hyper-parameters as 0-d arrays).
    reference: see above (a string); the NumPy reference is `numpy_reference`.
    numpy_reference: inputs -> outputs, in this process, or None.
    peer: "module:function" (inputs -> outputs) run in the peers' process, or None.
    needs: the peer packages `peer` imports (keys of `benchmarks.peers.install.PACKAGES`).
    needs_data: True when `ours` reads `context.data_dir` (skipped, and said so, without it).
    difference: (outputs, reference) -> the number held to `tolerance`; default
      `max_difference`.
  """
  name: str
  reference: str
  tolerance: float
  ours: Callable[[Context], Tuple[Arrays, Arrays]]
  numpy_reference: Optional[Callable[[Arrays], Arrays]] = None
  peer: Optional[str] = None
  needs: Tuple[str, ...] = ()
  needs_data: bool = False
  difference: Optional[Callable[[Arrays, Arrays], float]] = None

  def compare(self, outputs: Arrays, reference: Arrays) -> float:
    """The number held to `tolerance` (`difference`, default `max_difference`)."""
    return (self.difference or max_difference)(outputs, reference)

  def __post_init__(self):
    if (self.numpy_reference is None) == (self.peer is None):
      raise ValueError(f"check {self.name!r}: give exactly one of numpy_reference and peer")


def max_difference(outputs: Arrays, reference: Arrays) -> float:
  """The largest absolute difference over the keys of `outputs` (a missing key or shape: inf)."""
  worst = 0.0
  for key, value in outputs.items():
    if key not in reference:
      return float("inf")
    a = np.asarray(value, np.float64)
    b = np.asarray(reference[key], np.float64)
    if a.shape != b.shape:
      return float("inf")
    if a.size:
      worst = max(worst, float(np.max(np.abs(a - b))))
  return worst


def quantile_difference(key: str, quantile: float) -> Callable[[Arrays, Arrays], float]:
  """A `Check.difference`: `max_difference` over every key but `key`, and for `key` the
  `quantile` (e.g. 0.99) over examples (its first axis) of each example's largest
  absolute difference; the larger of the two.

  For iterative attacks on a trained network, where a gradient coordinate that
  is a rounding-level tie (its exact value about 1e-8 of the example's
  largest) takes one sign in one float32 implementation and the other sign in
  the other, and the two runs of that example part: every other key (the
  verdicts) must still agree on every example.
  """
  def difference(outputs, reference):
    others = {k: v for k, v in outputs.items() if k != key}
    worst = max_difference(others, reference)
    if key not in reference:
      return float("inf")
    a = np.asarray(outputs[key], np.float64)
    b = np.asarray(reference[key], np.float64)
    if a.shape != b.shape or not a.ndim:
      return float("inf")
    per_example = np.abs(a - b).reshape(len(a), -1).max(1)
    return max(worst, float(np.quantile(per_example, quantile, method="lower")))
  return difference


def checks() -> List[Check]:
  """Every check of every module of this package, in module then definition order."""
  found = []
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if info.name.startswith("_"):
      continue
    module = importlib.import_module(f"{__name__}.{info.name}")
    found.extend(getattr(module, "CHECKS", ()))
  names = [c.name for c in found]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"fidelity checks named twice: {duplicates}")
  return found
