"""The gradient-masking checks' files in a level folder, read and written without TensorFlow.

The checks themselves (the attacks, `check_level`) are
`robust_sparse.experiments.masking_checks`; their verdicts and table are
`analysis/masking.py`'s. What they store, and whether stored results are those
a run's settings make, is here, so that `run_analysis` reads finished checks
without importing TensorFlow:

  masking.json           the settings and the accuracies (clean and the four attacks)
  masking_examples.npz   `adversarial` (the pgd examples), `labels`, `predictions` (clean)
  masking_transfer.json  trial t's accuracy on trial s's stored examples, per s

Pure Python and NumPy.
"""

import dataclasses
import os
from typing import Callable, Dict, Optional

import numpy as np

from robust_sparse.core import files

RESULTS_FILE = "masking.json"
EXAMPLES_FILE = "masking_examples.npz"
TRANSFER_FILE = "masking_transfer.json"
# The white-box attacks, in the order they run and the tables show them.
ATTACKS = ("fgsm", "pgd", "pgd_strong", "eps1")
STRONG_STEPS_FACTOR = 5
STRONG_RESTARTS = 5
LARGE_EPS = 1.0
LARGE_EPS_STEP_SIZE = 0.1
LARGE_EPS_STEPS = 20
# Images per attack batch; every batch is padded to it (one compiled shape), and
# the random starts are drawn per batch, so it is part of what the numbers are.
BATCH_SIZE = 500


@dataclasses.dataclass(frozen=True)
class Budget:
  """A run's L-infinity attack budget (`--eps`, `--pgd_step_size`, `--pgd_steps`)."""
  eps: float
  step_size: float
  steps: int

  @classmethod
  def of(cls, hp) -> "Budget":
    return cls(float(hp.eps), float(hp.pgd_step_size), int(hp.pgd_steps))


def matches(stored: dict, hp, examples: Optional[int]) -> bool:
  """Whether stored results are those `check_level(hp, ..., examples=examples)` makes.

  `examples=None` takes whatever count was stored. A stored count below the
  requested one means the test set had no more images, so any request at
  least as large gets the same images.
  """
  if (stored.get("seed") != hp.seed or stored.get("batch_size") != BATCH_SIZE
      or {k: stored.get(k) for k in ("eps", "step_size", "steps")}
      != dataclasses.asdict(Budget.of(hp))):
    return False
  if examples is None:
    return True
  count = stored.get("examples")
  return count == examples or (count < stored.get("requested_examples", count)
                               and examples >= count)


def load_level(directory: str, hp, examples: Optional[int] = None) -> Optional[dict]:
  """A level's stored results (see `check_level`), or None.

  None when the level has none, they are unreadable, or they were made with
  other settings (budget, seed, batch size, number of images `examples`;
  None: any number).
  """
  path = os.path.join(directory, RESULTS_FILE)
  if not (os.path.exists(path) and os.path.exists(os.path.join(directory, EXAMPLES_FILE))):
    return None
  try:
    stored = files.read_json(path)
  except (OSError, ValueError):
    return None
  if not isinstance(stored, dict) or not isinstance(stored.get("accuracies"), dict):
    return None
  return stored if matches(stored, hp, examples) else None


def load_examples(directory: str) -> Dict[str, np.ndarray]:
  """A level's stored arrays (`attack_network`'s)."""
  return files.load_arrays(os.path.join(directory, EXAMPLES_FILE))


def transfer(target_dir: str, source_dir: str, source_trial: int,
             compute: Callable[[], float]) -> float:
  """Trial t's accuracy on the stored pgd examples of `source_trial`, at one level.

  Read from the target's `TRANSFER_FILE` when it holds the result for these
  two levels' stored files; else `compute()` and added to it.
  """
  digests = {"target": files.read_json(os.path.join(target_dir, RESULTS_FILE))["digest"],
             "source": files.read_json(os.path.join(source_dir, RESULTS_FILE))["digest"]}
  path = os.path.join(target_dir, TRANSFER_FILE)
  try:
    cache = files.read_json(path)
  except (OSError, ValueError):
    cache = {}
  if not isinstance(cache, dict):
    cache = {}
  entry = cache.get(str(source_trial))
  if isinstance(entry, dict) and entry.get("digests") == digests:
    return float(entry["accuracy"])
  accuracy = float(compute())
  cache[str(source_trial)] = {"accuracy": accuracy, "digests": digests}
  files.write_json(path, cache)
  return accuracy
