"""The peers' packages, installed into a folder of their own, never into the toolkit's environment.

torch, torchattacks, delve and ART are the PyTorch peers' only: installed beside
the toolkit they would break `pip check` (torchattacks pins `requests~=2.25`
and wants torchvision, which its attacks never import; delve wants torch).
`ensure` installs what is missing into `folder` with `pip install --target`
(torchattacks, delve and ART without their dependencies) and returns the
environment that puts `folder` first on the peers' `PYTHONPATH`; a torch
already installed system-wide is used as it is.
"""

import importlib.util
import os
import subprocess
import sys
from typing import Dict, Optional, Sequence

DEFAULT_FOLDER = os.path.join(os.path.expanduser("~"), ".cache", "robust_sparse", "peers")

# module -> (pip requirement, install its dependencies too)
PACKAGES = {
    "torch": ("torch==2.13.0", True),
    "torchattacks": ("torchattacks==3.5.1", False),
    # Saturation's reference. Without its dependencies: numpy, pandas, matplotlib and tqdm
    # are the toolkit's own (requirements.txt, seen by the peers' process), torch is above,
    # and tensorboardX is optional (delve imports it in a try).
    "delve": ("delve==0.1.50", False),
  # ART's AutoAttack, the second peer of `benchmarks.bench_autoattack` (over the PyTorch port).
  # Without its dependencies: numpy, scipy, scikit-learn, six, tqdm and setuptools are the
  # toolkit's own or torch's.
  "art": ("adversarial-robustness-toolbox==1.20.1", False),
  # ART's AutoAttack imports it (for its optional process pool) on every run; with its one
  # dependency, dill.
  "multiprocess": ("multiprocess==0.70.19", True),
}


def missing(modules: Sequence[str], folder: str):
  """The modules of `modules` that neither this environment nor `folder` provides."""
  added = folder not in sys.path
  if added:
    sys.path.insert(0, folder)
  importlib.invalidate_caches()
  try:
    return sorted(m for m in set(modules) if importlib.util.find_spec(m) is None)
  finally:
    if added:
      sys.path.remove(folder)


def install_hint(modules: Sequence[str], folder: str) -> str:
  return " && ".join(
      f"pip install {'' if PACKAGES[m][1] else '--no-deps '}--target {folder} {PACKAGES[m][0]}"
      for m in sorted(modules))


def ensure(modules: Sequence[str], folder: str = DEFAULT_FOLDER,
           install: bool = True) -> Optional[Dict[str, str]]:
  """Makes `modules` importable from `folder`, installing them there if `install`.

  Returns:
    The environment for the peers' processes (`folder` and the repository on
    `PYTHONPATH`), or None when a module is missing and could not be installed
    (a note on stdout says how to install it).
  """
  absent = missing(modules, folder)
  if absent and install:
    os.makedirs(folder, exist_ok=True)
    for module in absent:
      requirement, with_deps = PACKAGES[module]
      command = [sys.executable, "-m", "pip", "install", "-q", "--target", folder, requirement]
      if not with_deps:
        command.insert(4, "--no-deps")
      print(f"installing the peer's {requirement} into {folder}", flush=True)
      result = subprocess.run(command, capture_output=True, text=True)
      if result.returncode != 0:
        print(f"note: could not install {requirement}: {result.stderr.strip()[-500:]}")
    absent = missing(modules, folder)
  if absent:
    print(f"note: the PyTorch peers need {' and '.join(absent)}, not installed here; nothing "
          f"timed. They go into a folder of their own, never into requirements.txt or this "
          f"environment: {install_hint(absent, folder)}")
    return None
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [folder, repo] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env
