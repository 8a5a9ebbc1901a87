"""Writes synthetic run folders, in the format of `run_experiments`, with known numbers.

The numbers follow closed forms so tests can state the expected table values:
  final test acc  = ACC_BASE[attack] - 0.05*adv_train - ACC_DROP[exp]*k + 0.01*t
  final test adv  = ADV_BASE[attack] + 0.40*adv_train - 0.01*k + 0.01*t
for trial t and prune iteration k. Accuracy rises linearly to that value over
training; the validation loss is a parabola whose minimum sits at iteration
`early_stop_iteration(k)`.

Newer engines' logs are written with `new_columns=True` (extra columns `epoch`,
`lr`, `top5`, in another order), and a level listed in `diverged` is written
the way the engine leaves a level whose loss became NaN.
"""

import glob
import hashlib
import json
import os
from typing import Iterable, Optional, Tuple

import numpy as np

from robust_sparse.core import files

# Remaining weights of dense-300-100 under 20%/20%/10% layer-wise pruning.
WEIGHTS_REMAINING = (266200, 213057, 170532, 136503, 109272, 87480, 70040)
WEIGHTS_TOTAL = 266200
ACC_BASE = {"fgsm": 0.95, "pgd": 0.90}
ADV_BASE = {"fgsm": 0.30, "pgd": 0.10}
ACC_DROP = {"reinit_orig": 0.004, "reinit_rand": 0.02, "reinit_none": 0.006,
            "no_pruning": 0.0, "train": 0.0}
TRAIN_ITERS = 300
EVAL_EVERY = 100
ITERATIONS_PER_EPOCH = 50
# Where a diverged level's loss became NaN; its logs stop one evaluation before.
DIVERGED_ITERATION = 200
OLD_COLUMNS = ("iteration", "loss", "acc", "adv_acc", "nat_loss", "adv_loss")
NEW_COLUMNS = ("iteration", "epoch", "lr", "acc", "loss", "top5", "adv_acc",
               "adv_loss", "nat_loss")


def percent_weights_remaining(prune_iteration: int) -> float:
  return 100 * WEIGHTS_REMAINING[prune_iteration] / WEIGHTS_TOTAL


def final_acc(attack, adv_train, experiment, trial, prune_iteration):
  return (ACC_BASE[attack] - 0.05 * adv_train
          - ACC_DROP[experiment] * prune_iteration + 0.01 * trial)


def final_adv_acc(attack, adv_train, trial, prune_iteration):
  return ADV_BASE[attack] + 0.40 * adv_train - 0.01 * prune_iteration + (
      0.01 * trial)


def early_stop_iteration(prune_iteration: int) -> int:
  return EVAL_EVERY * (1 + prune_iteration % 3)


def _write_csv(path, columns, rows):
  with open(path, "w") as f:
    f.write(",".join(columns) + "\n")
    for row in rows:
      f.write(",".join(str(int(row[c])) if c == "iteration"
                       else repr(float(row[c])) for c in columns) + "\n")


def write_prune_iteration(folder, attack, adv_train, experiment, trial,
                          prune_iteration, completed=True, diverged=False,
                          new_columns=False, acc_offset=0.0):
  """Writes one `prune_iter_<k>` folder (CSVs, npy files, metadata).

  Args:
    completed: False leaves the level as a killed run does (partial CSVs, no
      metadata.json).
    diverged: writes the level as one whose loss became NaN at
      `DIVERGED_ITERATION`.
    new_columns: logs `NEW_COLUMNS` instead of `OLD_COLUMNS`.
    acc_offset: added to every accuracy (tells settings apart).
  """
  os.makedirs(folder, exist_ok=True)
  acc = final_acc(attack, adv_train, experiment, trial, prune_iteration)
  acc += acc_offset
  adv_acc = final_adv_acc(attack, adv_train, trial, prune_iteration)
  stop = early_stop_iteration(prune_iteration)
  iterations = range(0, TRAIN_ITERS + 1, EVAL_EVERY)
  for split in ("train", "valid", "test"):
    rows = []
    for iteration in iterations:
      if split == "train" and iteration == 0:
        continue  # Running means: no row before the first batch.
      if diverged and iteration >= DIVERGED_ITERATION:
        break  # The engine keeps the rows up to the last finite evaluation.
      progress = iteration / TRAIN_ITERS
      loss = 0.5 + 0.1 * ((iteration - stop) / EVAL_EVERY)**2
      rows.append({
          "iteration": iteration, "loss": loss,
          "acc": acc - 0.1 * (1 - progress),
          "adv_acc": adv_acc - 0.1 * (1 - progress),
          "nat_loss": loss - 0.1, "adv_loss": loss + 0.1,
          "epoch": iteration / ITERATIONS_PER_EPOCH,
          "lr": 0.1 * (1 - progress),
          "top5": min(1.0, acc + 0.04) - 0.1 * (1 - progress)})
    if not completed:
      rows = rows[:2]
    _write_csv(os.path.join(folder, f"{split}.csv"),
               NEW_COLUMNS if new_columns else OLD_COLUMNS, rows)
  for kind in ("masks", "init_kernels", "post_kernels"):
    os.makedirs(os.path.join(folder, kind), exist_ok=True)
    np.save(os.path.join(folder, kind, "output.npy"), np.ones((2, 2)))
  metadata = {"trial": trial, "prune_iteration": prune_iteration}
  if experiment != "train":  # An unpruned level may not report its weights.
    metadata.update(
        percent_weights_remaining=percent_weights_remaining(prune_iteration),
        weights_remaining=WEIGHTS_REMAINING[prune_iteration],
        weights_total=WEIGHTS_TOTAL)
  if diverged:
    metadata.update(completed=False, diverged=True,
                    diverged_iteration=DIVERGED_ITERATION)
  elif completed:
    metadata.update(completed=True, final_iteration=TRAIN_ITERS, files={
        f"{split}.csv": files.csv_record(os.path.join(folder, f"{split}.csv"))
        for split in ("train", "valid", "test")})
  else:
    return
  with open(os.path.join(folder, "metadata.json"), "w") as f:
    json.dump(metadata, f)


def write_run(base_dir, experiment="reinit_orig", attack="fgsm",
              adv_train=False, dataset="digits", model="dense-300-100",
              trials=3, prune_iters=3, unfinished: Iterable[Tuple[int, int]] = (),
              skip_trials: Iterable[int] = (),
              diverged: Iterable[Tuple[int, int]] = (), new_columns=False,
              acc_offset=0.0, **extra_hparams) -> str:
  """Writes one run folder; returns its path.

  The folder name ends in a hash of the hyper-parameters (all but `trials`),
  as the engine's does, so runs that differ in any field get their own.

  Args:
    unfinished: (trial, prune_iteration) pairs left without metadata.json and
      with partial CSVs, as a killed run leaves them.
    skip_trials: trials whose folder is not written at all.
    diverged: (trial, prune_iteration) pairs whose loss became NaN; the
      trial's later levels are not written (the engine cannot prune on).
    new_columns: logs with `NEW_COLUMNS` (epoch, lr, top5).
    acc_offset: added to every accuracy of the run.
    extra_hparams: more hparams.json keys (they may tell settings apart).
  """
  mode = "adv" if adv_train else "natural"
  hparams = dict(dataset=dataset, model=model, experiment=experiment,
                 attack=attack, adv_train=adv_train, trials=trials,
                 prune_iters=prune_iters, train_iters=TRAIN_ITERS,
                 eval_every=EVAL_EVERY, learning_rate=0.0012, l1_reg=0.0,
                 seed=1234, batch_size=60)
  hparams.update(extra_hparams)
  hashed = {k: v for k, v in hparams.items() if k != "trials"}
  digest = hashlib.sha256(
      json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:10]
  run_dir = os.path.join(base_dir, dataset, model, experiment, attack,
                         f"{mode}_{digest}")
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "hparams.json"), "w") as f:
    json.dump(hparams, f)
  unfinished, diverged = set(unfinished), dict(diverged)
  iterations = (1 if experiment in ("no_pruning", "train")
                else prune_iters + 1)
  for trial in range(trials):
    if trial in skip_trials:
      continue
    for k in range(iterations):
      if trial in diverged and k > diverged[trial]:
        break
      write_prune_iteration(
          os.path.join(run_dir, f"trial_{trial}", f"prune_iter_{k}"),
          attack, adv_train, experiment, trial, k,
          completed=(trial, k) not in unfinished,
          diverged=diverged.get(trial) == k, new_columns=new_columns,
          acc_offset=acc_offset)
  return run_dir


def write_study(base_dir, experiments=("reinit_orig", "reinit_rand"),
                attacks=("fgsm", "pgd"), adv_trains=(False, True),
                **kwargs) -> Optional[str]:
  """Writes every combination of experiment x attack x adv_train."""
  for experiment in experiments:
    for attack in attacks:
      for adv_train in adv_trains:
        write_run(base_dir, experiment=experiment, attack=attack,
                  adv_train=adv_train, **kwargs)
  return base_dir


def rerecord(run_dir):
  """Re-records every finished level's CSVs in its metadata.json, as the runner does.

  For tests that rewrite a run's logs to stand for what another engine wrote
  (extra columns, another column order); without it the analysis refuses
  the level (its logs disagree with its metadata.json).
  """
  for path in glob.glob(os.path.join(run_dir, "trial_*", "prune_iter_*", "metadata.json")):
    folder = os.path.dirname(path)
    with open(path) as f:
      metadata = json.load(f)
    if "files" in metadata:
      metadata["files"] = {name: files.csv_record(os.path.join(folder, name))
                           for name in metadata["files"]}
      with open(path, "w") as f:
        json.dump(metadata, f)
