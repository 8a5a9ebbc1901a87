"""Fanning the trials of one command out as Ray tasks (`--launcher=ray`).

Every trial of every run of the command (a grid's points included) becomes one
Ray task with its resource request (`--gpus_per_trial`, fractions allowed; one
CPU), which trains that trial's levels in order in the same run folder a
sequential run writes (`Runner.run(trials=[t], finish=False)`), so the folders,
files and numbers are the sequential run's. A task whose worker dies is
retried (`--max_retries`) and resumes from the level's checkpoint: the level
claim (`robust_sparse.core.claims`) of the dead worker is stale and taken over. A
re-run of the command resumes, as always. Once every task is done, the
driver finishes each run (the experiment's `after_run`, `--probes`).

`--ray_address=auto` joins a running cluster (`ray start --head` on one
machine, `ray start --address=...` on the others; every machine needs this
repository, the data folder and the base folder at the same paths: the driver
ships the repository with the job as its working directory); unset starts a
local Ray on this machine. Ray is optional: `pip install -r requirements-ray.txt`.
"""

import os
import socket
import sys
from typing import List, Optional, Sequence, Tuple

import robust_sparse
from robust_sparse.core.hparams import Hparams

# A source checkout's root, which the workers import the toolkit from (never a
# folder inside the package: its `data`, `models` ... would become top-level
# names); None for an installed copy, which every worker imports as the driver does.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(robust_sparse.__file__)))
REPO = _ROOT if os.path.isfile(os.path.join(_ROOT, "run_experiments.py")) else None
INSTALL = "pip install -r requirements-ray.txt"


def import_ray():
  """The `ray` module, or a one-line ValueError saying how to install it."""
  try:
    import ray  # pylint: disable=import-outside-toplevel  Optional: --launcher=ray only.
  except ImportError:
    raise ValueError(f"--launcher=ray needs Ray, which is not installed: {INSTALL}") from None
  return ray


def start(address: Optional[str], num_cpus: Optional[int] = None):
  """Starts (or joins, with `address`) Ray; a one-line ValueError when it cannot."""
  ray = import_ray()
  if ray.is_initialized():
    return ray
  if address and address != "auto":
    _check_reachable(address)
  if REPO is None:
    runtime_env = {}
  elif address:
    runtime_env = {"working_dir": REPO,
                   "excludes": [".git", "output", "*.npz", "custom_ops/_build"]}
  else:
    runtime_env = {"env_vars": {"PYTHONPATH": REPO}}
  try:
    ray.init(address=address or None, num_cpus=None if address else num_cpus,
             include_dashboard=False, log_to_driver=True, runtime_env=runtime_env,
             configure_logging=False)
  except (ConnectionError, RuntimeError, ValueError) as error:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f"--ray_address={address}" if address else "a local Ray"
    raise ValueError(f"{where}: Ray cannot start ({first})") from None
  return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
  """A one-line ValueError unless `host:port` accepts a TCP connection (Ray would retry
  for a minute before failing)."""
  host, _, port = address.replace("ray://", "").rpartition(":")
  try:
    with socket.create_connection((host, int(port)), timeout=timeout):
      return
  except (OSError, ValueError) as error:
    raise ValueError(f"--ray_address={address}: cannot connect ({error})") from None


def _train_trial(hparams: dict, base_dir: str, trial: int) -> str:
  """A Ray task: the levels of one trial, in the run folder of a sequential run."""
  if REPO and REPO not in sys.path:
    sys.path.insert(0, REPO)
  # Heavy: TensorFlow, which the worker needs and the driver does not; after the path.
  # pylint: disable=import-outside-toplevel
  from robust_sparse.data import load_dataset
  from robust_sparse.experiments.runner import Runner
  hp = Hparams.from_dict(hparams)
  dataset = load_dataset(hp.dataset, hp.data_dir, hp.valid_size, resolution=hp.resolution)
  return Runner(hp, dataset, base_dir, progress=False).run(trials=[trial], finish=False)


def run_trials(jobs: Sequence[Tuple[object, str]], *, address: Optional[str] = None,
               gpus_per_trial: float = 0.0, max_retries: int = 2,
               num_cpus: Optional[int] = None) -> List[str]:
  """Trains every trial of `jobs` ([(Hparams, base_dir)]) as Ray tasks; waits for all.

  Returns:
    The run folders, one per job, in order.

  Raises:
    ValueError: Ray missing or unable to start, or a task that failed after its
      retries (its error's first line).
  """
  ray = start(address, num_cpus)
  task = ray.remote(num_cpus=1, num_gpus=gpus_per_trial, max_retries=max_retries,
                    retry_exceptions=False)(_train_trial)
  refs = [[task.remote(hp.to_dict(), base_dir, trial) for trial in range(hp.trials)]
          for hp, base_dir in jobs]
  folders = []
  for (hp, _), job_refs in zip(jobs, refs):
    try:
      results = ray.get(job_refs)
    except ray.exceptions.RayError as error:
      cause = getattr(error, "cause", None) or error
      first = str(cause).strip().splitlines()[-1] if str(cause).strip() else repr(cause)
      raise ValueError(f"a Ray task of {hp.run_dir('')} failed: {first}") from None
    folders.append(results[0] if results else None)
  return folders
