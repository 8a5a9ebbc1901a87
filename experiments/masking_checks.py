"""The gradient-masking checks' attacks on a trained network, and the level files keeping them.

A defence that only hides its gradients (saturated softmax, shattered or
stochastic gradients; Athalye, Carlini & Wagner 2018) looks robust to the
gradient attacks it was trained and evaluated with, but fails simple sanity
checks (Carlini et al. 2019). This module measures what those checks compare;
their verdicts, table, figure and report section are `analysis/masking.py`'s.
Each trial's final network of a level is attacked on the first N test images
(`--masking_examples`, 500), with the true labels, by

  fgsm        FGSM at the run's eps;
  pgd         PGD at the run's eps, step size and steps, random start;
  pgd_strong  the same PGD with 5x the steps and 5 random restarts (the first
              restart starts where `pgd` does);
  eps1        PGD with eps 1.0 (the whole [0, 1] pixel range), step 0.1, 20 steps;
  transfer    the `pgd` examples crafted on trial (t + 1) mod T of the same run,
              shown to trial t.

Each number is a robust accuracy: the fraction of the images classified
correctly both clean and attacked. The random starts of batch b of attack a
on trial t derive from (`--seed`, t, a, b) alone, in batches of `BATCH_SIZE`.

The four white-box attacks need the network's gradients, so the runner makes
them at the end of every level (`--masking_checks`, on by default for
adversarially trained runs), where the network is built and holds its final
weights, and writes into the level's folder, before `metadata.json` (a killed
run redoes them):

  masking.json           the settings and the accuracies (clean and the four attacks)
  masking_examples.npz   `adversarial` (the pgd examples), `labels`, `predictions` (clean)

The transfer check then needs only a forward pass of trial t on trial
(t + 1) mod T's stored examples (`masking_store.transfer`), cached in trial t's
`masking_transfer.json`. `run_analysis` reads these files; for levels without
them (runs finished before, or `--nomasking_checks`) it calls `check_level`
once and the files are written as the runner writes them.
"""

import dataclasses
import hashlib
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from robust_sparse.attacks import AttackConfig, make_attack
from robust_sparse.core import files
# The files, settings and budgets live in core (read without TensorFlow); re-exported here.
from robust_sparse.core.masking_store import (  # noqa: F401  pylint: disable=unused-import
    ATTACKS, BATCH_SIZE, EXAMPLES_FILE, LARGE_EPS, LARGE_EPS_STEP_SIZE, LARGE_EPS_STEPS,
    RESULTS_FILE, STRONG_RESTARTS, STRONG_STEPS_FACTOR, TRANSFER_FILE, Budget, load_examples,
    load_level)
from robust_sparse.core.run_folder import derived_seed
from robust_sparse.core.streams import Stream


def enabled(hp) -> bool:
  """Whether the runner makes the checks: `--masking_checks`, unset: `--adv_train`."""
  if hp.attack == "none":
    return False
  return hp.adv_train if hp.masking_checks is None else hp.masking_checks


def check_options(hp):
  """Raises a one-line ValueError for `--masking_checks` without an attack."""
  if hp.masking_checks and hp.attack == "none":
    raise ValueError("--masking_checks attacks with the run's --eps, --pgd_step_size and "
                     "--pgd_steps: it needs an --attack, got --attack=none")


def attack_configs(budget: Budget) -> Dict[str, AttackConfig]:
  """{name: `attacks.AttackConfig`} of the four white-box attacks (true labels)."""
  pgd = AttackConfig("pgd", eps=budget.eps, step_size=budget.step_size, steps=budget.steps,
                     random_start=True, labels="true")
  return {
      "fgsm": AttackConfig("fgsm", eps=budget.eps, labels="true"),
      "pgd": pgd,
      "pgd_strong": dataclasses.replace(pgd, steps=STRONG_STEPS_FACTOR * budget.steps,
                                        restarts=STRONG_RESTARTS),
      "eps1": AttackConfig("pgd", eps=LARGE_EPS, step_size=LARGE_EPS_STEP_SIZE,
                           steps=LARGE_EPS_STEPS, random_start=True, labels="true"),
  }


def test_images(dataset, count: int) -> Tuple[np.ndarray, np.ndarray]:
  """The first `count` test images as the model sees them (decoded, prepared), and labels."""
  count = min(count, len(dataset.y_test))
  x, y = dataset.x_test[:count], np.asarray(dataset.y_test[:count])
  if dataset.decode_eval is not None:
    x = np.stack([dataset.decode_eval(tf.constant(path)).numpy() for path in x])
  if dataset.prepare is not None:
    # A fixed seed (the raw pair [0, FIXED_SET_PREPARE], not a `stream_seed`): the
    # runner's evaluation seeds its random positioning per batch.
    x = dataset.prepare(tf.constant(x, tf.float32),
                        tf.constant([0, int(Stream.FIXED_SET_PREPARE)], tf.int64)).numpy()
  return np.asarray(x, np.float32), y.astype(np.int64)


def _in_batches(fn: Callable, count: int, batch_size: int) -> np.ndarray:
  """`fn(indices, batch_number)` over `range(count)` in equal batches, concatenated.

  The last batch is padded with the first images (and the padding dropped), so
  a compiled function sees one batch shape and XLA compiles it once.
  """
  size = min(batch_size, count)
  outputs = []
  for number, start in enumerate(range(0, count, size)):
    indices = np.arange(start, start + size) % count
    real = min(size, count - start)
    outputs.append(np.asarray(fn(indices, number))[:real])
  return np.concatenate(outputs)


def predictions(model, x: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
  """int64 [n]: the class `model` gives each image of `x`."""
  def predict(indices, _):
    return np.argmax(np.asarray(model(x[indices], training=False)), axis=-1)
  return _in_batches(predict, len(x), batch_size).astype(np.int64)


def correct(model, x: np.ndarray, y: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
  """Boolean [n]: `model` classifies each image of `x` as `y`."""
  return predictions(model, x, batch_size) == y


def attack_network(model, x: np.ndarray, y: np.ndarray, budget: Budget, *, seed: int,
                   trial: int, batch_size: int = BATCH_SIZE,
                   desc: Optional[str] = None) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
  """One network's clean accuracy and robust accuracies under the four white-box attacks.

  Args:
    model: the network, ready to call (its attacks compile once per model).
    x: float32 images in [0, 1], [n, ...], as the model sees them.
    y: int true labels [n].
    budget: the run's attack budget.
    seed: the run's seed; with `trial`, the attacks' random starts derive from it.
    trial: the trial the network belongs to.
    batch_size: images per attack batch.
    desc: show a progress bar over the attacks with this description; None: none.

  Returns:
    ({"clean", *ATTACKS: accuracy in [0, 1]}, the arrays the transfer check
    needs: {"adversarial": the pgd examples [n, ...], "labels": y,
    "predictions": the classes of the clean images [n]}).
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y).astype(np.int64)
  y_tensor = tf.constant(y, tf.int32)
  clean_predictions = predictions(model, x, batch_size)
  clean = clean_predictions == y
  accuracies = {"clean": float(clean.mean())}
  examples = {"labels": y, "predictions": clean_predictions}
  configs = attack_configs(budget)
  for name in tqdm(ATTACKS, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
    attack = make_attack(configs[name])
    # The strong PGD's first restart starts where PGD does: a luckier random
    # start cannot make either look stronger than the other.
    stream = "pgd" if name == "pgd_strong" else name

    def craft(indices, number, attack=attack, stream=stream):
      seed_pair = tf.constant([derived_seed(seed, trial, stream, int(number)), 0], tf.int64)
      return attack(model, x[indices], tf.gather(y_tensor, indices), seed=seed_pair)

    adversarial = _in_batches(craft, len(y), batch_size)
    accuracies[name] = float((clean & correct(model, adversarial, y, batch_size)).mean())
    if name == "pgd":
      examples["adversarial"] = adversarial
  return accuracies, examples


def transfer_accuracy(model, target: Dict[str, np.ndarray], source: Dict[str, np.ndarray],
                      batch_size: int = BATCH_SIZE) -> float:
  """The fraction of images `model` classifies correctly clean and on `source`'s pgd examples.

  Args:
    model: the target trial's network.
    target: its `attack_network` arrays (`labels`, `predictions`).
    source: the source trial's arrays (`adversarial`, `labels`).

  Raises:
    ValueError: the two were made on different images.
  """
  if not np.array_equal(target["labels"], source["labels"]):
    raise ValueError(f"transfer between checks of different test images "
                     f"({len(target['labels'])} and {len(source['labels'])})")
  survived = correct(model, source["adversarial"], source["labels"], batch_size)
  return float(((target["predictions"] == target["labels"]) & survived).mean())


def evaluate_trials(model_of: Callable[[int], object], trials: int, x: np.ndarray,
                    y: np.ndarray, budget: Budget, *, seed: int = 0,
                    batch_size: int = BATCH_SIZE) -> List[Dict[str, float]]:
  """Every measure of each trial of one run, computed in memory (no files).

  Args:
    model_of: `model_of(t)` returns trial t's model, ready to call; it may
      return one model object with trial t's weights assigned. Called twice
      per trial (the transfer attack needs every trial's examples first).
    trials: the number of trials T.
    x, y, budget, seed, batch_size: as `attack_network`.

  Returns:
    One dict per trial: "clean", `ATTACKS` and "transfer" -> accuracy in [0, 1]
    ("transfer" is NaN when T == 1), and "transfer_from": the trial whose
    pgd examples were transferred (-1 when T == 1).
  """
  results, arrays = [], []
  for trial in range(trials):
    accuracies, examples = attack_network(model_of(trial), x, y, budget, seed=seed,
                                          trial=trial, batch_size=batch_size)
    results.append(accuracies)
    arrays.append(examples)
  for trial, row in enumerate(results):
    if trials < 2:
      row.update(transfer=float("nan"), transfer_from=-1)
      continue
    source = (trial + 1) % trials
    row.update(transfer=transfer_accuracy(model_of(trial), arrays[trial], arrays[source],
                                          batch_size), transfer_from=source)
  return results


# ---- the level's files ------------------------------------------------------------------
def _digest(arrays: Dict[str, np.ndarray]) -> str:
  """A fingerprint of the stored examples (a transfer result is valid for these only)."""
  digest = hashlib.sha256()
  for name in sorted(arrays):
    array = np.ascontiguousarray(arrays[name])
    digest.update(f"{name}{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:16]


def check_level(hp, model, dataset, trial: int, directory: str, *,
                examples: Optional[int] = None, desc: Optional[str] = None) -> dict:
  """Attacks a level's final network (`attack_network`) and writes the level's files.

  Args:
    hp: the run's `Hparams` (budget, `--seed`, `--masking_examples`).
    model: the level's network holding its final weights.
    dataset: the run's `data.Dataset`.
    trial: the trial.
    directory: the level's folder.
    examples: attack the first this many test images; None: `--masking_examples`.
    desc: a progress bar's description; None: no bar.

  Returns:
    The stored results (`load_level`'s dict).
  """
  began = time.time()
  requested = hp.masking_examples if examples is None else examples
  x, y = test_images(dataset, requested)
  budget = Budget.of(hp)
  accuracies, arrays = attack_network(model, x, y, budget, seed=hp.seed, trial=trial,
                                      desc=desc)
  results = {"accuracies": accuracies, "examples": len(y), "requested_examples": requested,
             "seed": hp.seed, "batch_size": BATCH_SIZE, **dataclasses.asdict(budget),
             "digest": _digest(arrays)}
  files.save_arrays(os.path.join(directory, EXAMPLES_FILE), arrays)
  files.write_json(os.path.join(directory, RESULTS_FILE), results)
  logging.info("gradient-masking checks of %s (%d images, %.1f s): %s", directory, len(y),
               time.time() - began,
               ", ".join(f"{name} {value:.4f}" for name, value in accuracies.items()))
  return results

