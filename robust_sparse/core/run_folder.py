"""What a run folder holds and where: one place names a run's files (OpenLTH's `paths.py`).

A run folder (`Hparams.run_dir`, a pure function of the hyper-parameters)
holds `hparams.json` and one folder per trial and level:
`trial_<t>/prune_iter_<k>/`, with the level's CSV logs, `metadata.json` (a
level is finished iff it says `"completed": true`), its weights
(`weights_init.npz`, `weights_final.npz`, `weights_rewind.npz`,
`checkpoints/weights_<iteration>.npz`) and its `masks/`. The runner writes
them; the experiments, the analysis and the tests read them through this
module. Pure Python: no TensorFlow.
"""

import hashlib
import json
import os
import re

from robust_sparse.core import files
from robust_sparse.core.hparams import Hparams

HPARAMS_FILE = "hparams.json"
METADATA_FILE = "metadata.json"
# --compile=auto's timed choice, made once for the whole run (`Runner._settle_compile`).
COMPILE_FILE = "compile.json"
CHECKPOINTS = "checkpoints"  # --save_every_epochs' folder in a level.
REWIND_WEIGHTS = "weights_rewind.npz"  # The rewind experiment's snapshot of the dense level.
EPS_SWEEP_FILE = "eps_sweep.json"  # --eps_sweep's robust accuracies of a level (experiments/eps_sweep.py).
TRIAL_DIR = re.compile(r"^trial_(\d+)$")
LEVEL_DIR = re.compile(r"^prune_iter_(\d+)$")


def derived_seed(*parts) -> int:
  """A 31-bit seed that is a pure function of `parts`."""
  digest = hashlib.sha256(json.dumps(parts).encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def level_dir(run_dir, trial, level):
  return os.path.join(run_dir, f"trial_{trial}", f"prune_iter_{level}")


def checkpoint_path(directory, iteration) -> str:
  """Where `--save_every_epochs` keeps a level's weights at `iteration`."""
  return os.path.join(directory, CHECKPOINTS, f"weights_{iteration:08d}.npz")


def checkpoints(directory):
  """[(iteration, path)] of a finished level: initial, saved every N epochs, final."""
  found = [(0 if name == "weights_init.npz" else None, os.path.join(directory, name))
           for name in ("weights_init.npz",)]
  folder = os.path.join(directory, CHECKPOINTS)
  if os.path.isdir(folder):
    for name in sorted(os.listdir(folder)):
      match = re.fullmatch(r"weights_(\d+)\.npz", name)
      if match:
        found.append((int(match.group(1)), os.path.join(folder, name)))
  final = read_metadata(directory).get("final_iteration")
  found.append((final, os.path.join(directory, "weights_final.npz")))
  return [(i, p) for i, p in found if os.path.exists(p)]


def read_metadata(directory) -> dict:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.exists(path):
    return {}
  try:
    return files.read_json(path)
  except (OSError, ValueError):
    return {}


def is_finished(directory) -> bool:
  return bool(read_metadata(directory).get("completed"))


class LevelHistory:
  """The saved weights of a trial's earlier levels, read when an experiment asks."""

  def __init__(self, run_dir, trial):
    self._run_dir = run_dir
    self._trial = trial

  def path(self, level, name):
    return os.path.join(level_dir(self._run_dir, self._trial, level), name)

  def weights(self, level, name):
    """The arrays of `name` (e.g. "weights_final.npz") in the folder of `level`."""
    return files.load_arrays(self.path(level, name))

  def initial_weights(self, level):
    return self.weights(level, "weights_init.npz")

  def final_weights(self, level):
    return self.weights(level, "weights_final.npz")

  def rewind_weights(self, level):
    return self.weights(level, REWIND_WEIGHTS)


def read_hparams(run_dir: str, flag: str) -> Hparams:
  """The hyper-parameters of the run folder `run_dir`.

  Args:
    flag: the flag that named the folder, for error messages.

  Raises:
    ValueError: not a readable run folder.
  """
  try:
    return Hparams.from_dict(files.read_json(os.path.join(run_dir, HPARAMS_FILE)))
  except (OSError, ValueError) as e:
    raise ValueError(f"{flag}={run_dir}: not a readable run folder ({e})") from None


def check_matches(source: Hparams, hparams: Hparams, fields, named: str):
  """Checks that a run `hparams` builds on was made with the same `fields`.

  Args:
    source: the hyper-parameters of the run built on (a ticket, a pretrained run).
    named: how errors name that run, e.g. "--pretrained_run=DIR".

  Raises:
    ValueError: the first field that differs, both values named.
  """
  for field in fields:
    theirs, ours = getattr(source, field), getattr(hparams, field)
    if theirs != ours:
      raise ValueError(f"{named} was trained with --{field}={theirs}, not --{field}={ours}")


def finished_run(run_dir: str, flag: str, matches: Hparams = None, fields=()):
  """The hyper-parameters and final weights of trial 0, level 0 of the run folder `run_dir`.

  The one loader of a finished run that another run builds on (a teacher, a
  pretrained network, checkpoints to measure).

  Args:
    flag: the flag that named the folder, for error messages.
    matches, fields: with `matches`, the run must have been made with its
      values of `fields` (`check_matches`).

  Returns:
    (Hparams, {variable path: array}).

  Raises:
    ValueError: not a run folder, its level 0 is unfinished, or a field differs.
  """
  run_hp = read_hparams(run_dir, flag)
  directory = level_dir(run_dir, 0, 0)
  if not is_finished(directory):
    raise ValueError(f"{flag}={run_dir}: trial_0/prune_iter_0 is not finished")
  if matches is not None:
    check_matches(run_hp, matches, fields, f"{flag}={run_dir}")
  return run_hp, files.load_arrays(os.path.join(directory, "weights_final.npz"))
