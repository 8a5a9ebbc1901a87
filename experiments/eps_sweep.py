"""Robust accuracy against epsilon: the final network of a level attacked at each budget.

A single robustness number hides how quickly accuracy falls with the budget,
and two methods can cross: one may win at the trained eps and lose beyond it.
With `--eps_sweep=0,0.05,0.1,...` the runner attacks each trial's final
network of every level, where it is built and holds its final weights, at each
budget, on the first `--eps_sweep_examples` test images with the true labels,
and writes into the level's folder, before `metadata.json` (a killed run redoes
it):

  eps_sweep.json   the attack, the images, and the robust accuracy at each eps

The attack is `--eps_sweep_attack`, an `--eval_attacks` spec (default `pgd`:
the run's steps and step size, random start; `autoattack`, `apgd_ce`,
`pgd(steps=50,restarts=5)`, ...). Its budget is swept, so the spec must not set
`eps`; the step size scales with it (step at eps e = e x step_size / --eps: the
run's ratio, so PGD takes as many steps to cross the ball at every budget).
Robust accuracy is the fraction of the images classified correctly both clean
and attacked; at eps 0 it is the clean accuracy. The random starts of batch b
at budget i of trial t derive from (`--seed`, t, "eps_sweep", i, b) alone.

`analysis/robustness_curves.py` draws the curves per sparsity level and per
method, and their area (the mean robust accuracy over the swept budgets).
"""

import dataclasses
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from robust_sparse.attacks import spec as attack_spec
from robust_sparse.attacks.registry import AttackConfig, make_attack
from robust_sparse.core import files
from robust_sparse.core.run_folder import EPS_SWEEP_FILE, derived_seed
from robust_sparse.experiments import build, masking_checks

RESULTS_FILE = EPS_SWEEP_FILE
BATCH_SIZE = masking_checks.BATCH_SIZE
STREAM = "eps_sweep"


def enabled(hp) -> bool:
  return bool(hp.eps_sweep)


def _error(problem: str) -> ValueError:
  return ValueError(f"--eps_sweep_attack {problem}")


def budgets(hp) -> Tuple[float, ...]:
  """`--eps_sweep`'s budgets, checked: numbers >= 0, each once, increasing."""
  values = tuple(float(e) for e in hp.eps_sweep)
  if any(not np.isfinite(e) or e < 0 for e in values):
    raise ValueError(f"--eps_sweep takes budgets >= 0, got {','.join(map(str, hp.eps_sweep))}")
  if len(set(values)) != len(values) or list(values) != sorted(values):
    raise ValueError("--eps_sweep lists each budget once, in increasing order, got "
                     f"{','.join(format(e, 'g') for e in values)}")
  return values


def base_config(hp) -> Tuple[str, AttackConfig]:
  """(the spec's column name, its AttackConfig at the run's --eps, true labels)."""
  spec = hp.eps_sweep_attack.strip()
  if re.search(r"[(,]\s*eps\s*=", spec):
    raise _error(f"{spec!r}: the sweep sets eps; leave it out of the spec")
  defaults = dataclasses.replace(build.attack_config(
      dataclasses.replace(hp, attack=_defaults_attack(hp))), labels="true")
  try:
    name, config = attack_spec.resolve_attack_spec(spec, defaults)
  except ValueError as error:
    raise _error(str(error).split(": ", 1)[-1]) from None
  return name, dataclasses.replace(config, labels="true")


def _defaults_attack(hp) -> str:
  # The run's budget fills the spec's unset parameters; a run with --attack=none
  # has no attack of its own, so its budget is read as PGD's.
  return "pgd" if hp.attack == "none" else hp.attack


def configs(hp) -> List[Tuple[float, Optional[AttackConfig]]]:
  """[(eps, the attack's config at eps; None at eps 0)], in `--eps_sweep`'s order."""
  _, base = base_config(hp)
  out = []
  for eps in budgets(hp):
    if eps == 0:
      out.append((eps, None))
      continue
    if hp.eps > 0:
      step_size = base.step_size * eps / hp.eps
    else:  # No run budget to scale from: Madry et al.'s 2.5 eps / steps.
      step_size = 2.5 * eps / max(base.steps, 1)
    out.append((eps, dataclasses.replace(base, eps=eps, step_size=step_size)))
  return out


def check_options(hp):
  """One-line ValueErrors for a bad `--eps_sweep` or `--eps_sweep_attack`."""
  if not enabled(hp):
    return
  configs(hp)


def sweep(model, x: np.ndarray, y: np.ndarray, hp, trial: int,
          desc: Optional[str] = None) -> Dict[str, object]:
  """Robust accuracy of `model` on (x, y) at each budget of `--eps_sweep`.

  Returns:
    {"attack": the spec, "examples": n, "eps": [...], "accuracy": [...] in [0, 1]}.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y).astype(np.int64)
  y_tensor = tf.constant(y, tf.int32)
  clean = masking_checks.correct(model, x, y, BATCH_SIZE)
  accuracies = []
  for index, (eps, config) in enumerate(tqdm(configs(hp), desc=desc, disable=desc is None,
                                             leave=False, dynamic_ncols=True)):
    if config is None:
      accuracies.append(float(clean.mean()))
      continue
    attack = make_attack(config)

    def craft(indices, number, attack=attack, index=index):
      seed = tf.constant([derived_seed(hp.seed, trial, STREAM, index, int(number)), 0],
                         tf.int64)
      return attack(model, x[indices], tf.gather(y_tensor, indices), seed=seed)

    adversarial = masking_checks._in_batches(craft, len(y), BATCH_SIZE)  # pylint: disable=protected-access
    accuracies.append(float((clean & masking_checks.correct(model, adversarial, y,
                                                            BATCH_SIZE)).mean()))
  return {"attack": hp.eps_sweep_attack.strip(), "examples": int(len(y)),
          "eps": [float(e) for e in budgets(hp)], "accuracy": accuracies}


def sweep_level(model, dataset, hp, trial: int, directory: str,
                desc: Optional[str] = None) -> Dict[str, object]:
  """Sweeps the level's final network and writes `eps_sweep.json` into `directory`."""
  x, y = masking_checks.test_images(dataset, hp.eps_sweep_examples)
  results = sweep(model, x, y, hp, trial, desc)
  files.write_json(os.path.join(directory, RESULTS_FILE), results)
  return results
