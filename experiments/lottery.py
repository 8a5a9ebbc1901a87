"""Runs an experiment's trials and pruning levels, writing the run folder.

Layout (`run_dir = hparams.run_dir(base_dir)`):

  hparams.json
  trial_<t>/prune_iter_<k>/
    train.csv valid.csv test.csv   iteration,loss,acc,adv_acc,nat_loss,adv_loss
    masks/<layer>.npy              0/1 masks the level trained with
    init_kernels/<layer>.npy       kernels at the start of the level
    post_kernels/<layer>.npy       kernels at the end of the level
    weights_init.npz weights_final.npz [weights_rewind.npz]   all trainable weights
    metadata.json                  written last: the level is finished

Each stage checks for its own output first: finished levels are skipped, and an
interrupted level resumes from `checkpoint.npz` (written after every
evaluation), so re-running a killed command finishes it with the same numbers.
"""

import hashlib
import json
import os
import shutil
import time

import keras
import numpy as np
from absl import logging
from tqdm import tqdm

from attacks import make_attack
from experiments.registry import EXPERIMENTS
from models import build_model
from robust_sparse import files, pruning
from robust_sparse.layers import masked_layers
from robust_sparse.training import METRICS, Trainer, index_stream

COLUMNS = ("iteration",) + METRICS
SPLITS = ("train", "valid", "test")


def derived_seed(*parts) -> int:
  """A 31-bit seed that is a pure function of `parts`."""
  digest = hashlib.sha256(json.dumps(parts).encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def level_dir(run_dir, trial, level):
  return os.path.join(run_dir, f"trial_{trial}", f"prune_iter_{level}")


def is_finished(directory) -> bool:
  path = os.path.join(directory, "metadata.json")
  if not os.path.exists(path):
    return False
  try:
    return bool(files.read_json(path).get("completed"))
  except (OSError, ValueError):
    return False


class LevelHistory:
  """The saved weights of a trial's earlier levels, read when an experiment asks."""

  def __init__(self, run_dir, trial):
    self._run_dir = run_dir
    self._trial = trial

  def _load(self, level, name):
    return files.load_arrays(os.path.join(level_dir(self._run_dir, self._trial, level), name))

  def initial_weights(self, level):
    return self._load(level, "weights_init.npz")

  def final_weights(self, level):
    return self._load(level, "weights_final.npz")

  def rewind_weights(self, level):
    return self._load(level, "weights_rewind.npz")


def _kernels(layers):
  return {layer.name: np.asarray(layer.raw_kernel.numpy()) for layer in layers}


def _weights(model):
  return {v.path: np.asarray(v.numpy()) for v in model.trainable_variables}


def _save_layer_arrays(directory, sub, arrays):
  for name, array in arrays.items():
    files.save_npy(os.path.join(directory, sub, f"{name}.npy"), array)


def _load_layer_arrays(directory, sub, names):
  return {name: np.load(os.path.join(directory, sub, f"{name}.npy")) for name in names}


class LotteryRunner:
  """Runs every trial and level of one experiment (see the module docstring)."""

  def __init__(self, hparams, dataset, base_dir, *, force=False, progress=True):
    self.hparams = hparams
    self.dataset = dataset
    self.run_dir = hparams.run_dir(base_dir)
    self.progress = progress
    self.experiment = EXPERIMENTS.get(hparams.experiment)(hparams)
    self.attack = make_attack(hparams.attack_config())
    if force and os.path.isdir(self.run_dir):
      shutil.rmtree(self.run_dir)
    # One model and trainer serve every level, so each compiles only once.
    self._model = None
    self._trainer = None

  def run(self):
    """Runs (or finishes) every trial; returns the run folder."""
    os.makedirs(self.run_dir, exist_ok=True)
    files.write_json(os.path.join(self.run_dir, "hparams.json"), self.hparams.to_dict())
    for trial in range(self.hparams.trials):
      for level in range(self.experiment.levels()):
        self.run_level(trial, level)
    return self.run_dir

  # ---- one level -----------------------------------------------------------
  def _build(self, trial, level):
    hp = self.hparams
    keras.utils.set_random_seed(derived_seed(hp.seed, trial, level, "init"))
    return build_model(hp.model, self.dataset.input_shape, self.dataset.num_classes,
                       activation=hp.activation, l1_reg=hp.l1_reg)

  def _masks(self, trial, level, layers):
    if level == 0:
      return {layer.name: np.ones(layer.mask.shape, np.float32) for layer in layers}
    previous = level_dir(self.run_dir, trial, level - 1)
    names = [layer.name for layer in layers]
    hp = self.hparams
    if hp.prune_scope == "global":
      rates = {name: hp.prune_rate for name in names}
    else:
      rates = pruning.layer_rates(names, hp.prune_rate, hp.prune_rate_output)
    return pruning.prune(_load_layer_arrays(previous, "post_kernels", names),
                         _load_layer_arrays(previous, "masks", names), rates, hp.prune_scope)

  def _eval_points(self, start):
    hp = self.hparams
    points = {start, hp.train_iters}
    points.update(range(hp.eval_every * (start // hp.eval_every + 1), hp.train_iters,
                        hp.eval_every))
    return sorted(p for p in points if p >= start)

  def run_level(self, trial, level):
    """Trains one pruning level unless its folder says it is finished."""
    hp = self.hparams
    directory = level_dir(self.run_dir, trial, level)
    if is_finished(directory):
      return
    began = time.time()
    fresh = self._build(trial, level)
    if self._model is None:
      self._model = fresh
      self._trainer = Trainer(
          fresh, self.attack, self.dataset.x_train, self.dataset.y_train,
          num_classes=self.dataset.num_classes, learning_rate=hp.learning_rate,
          batch_size=hp.batch_size, adv_train=hp.adv_train, adv_mix=hp.adv_mix,
          label_smoothing=hp.label_smoothing)
    model, trainer = self._model, self._trainer
    weights, start = self.experiment.start(level, LevelHistory(self.run_dir, trial))
    # Non-trainable state (masks, activation step counters) starts fresh too.
    fresh_variables = {v.path: v for v in fresh.variables}
    weights = weights if weights is not None else {}
    for variable in model.variables:
      variable.assign(weights.get(variable.path, fresh_variables[variable.path]))
    layers = masked_layers(model)
    masks = self._masks(trial, level, layers)
    for layer in layers:
      layer.mask.assign(masks[layer.name])
      # Zero the pruned weights so that nothing (an L1 penalty, say) sees them.
      layer.raw_kernel.assign(layer.raw_kernel * masks[layer.name])

    trainer.reset(derived_seed(hp.seed, trial, level, "attack"), start)
    checkpoint = os.path.join(directory, "checkpoint.npz")
    logs = {split: [] for split in SPLITS}
    if os.path.exists(checkpoint):
      state = files.load_arrays(checkpoint)
      logs = json.loads(state.pop("logs").tobytes().decode())
      trainer.set_state([state[f"v{i}"] for i in range(len(state))])
      logging.info("resuming %s at iteration %d", directory, int(trainer.iteration.numpy()))
    else:
      _save_layer_arrays(directory, "masks", masks)
      _save_layer_arrays(directory, "init_kernels", _kernels(layers))
      files.save_arrays(os.path.join(directory, "weights_init.npz"), _weights(model))
      self._evaluate(trainer, logs, start)
      self._checkpoint(directory, trainer, logs)

    iteration = int(trainer.iteration.numpy())
    record_rewind = (level == 0 and hp.experiment == "rewind")
    eval_points = self._eval_points(start)
    stops = eval_points
    if record_rewind:
      stops = sorted(set(stops) | {hp.rewind_iteration})
      if hp.rewind_iteration == 0 and iteration == 0:
        files.save_arrays(os.path.join(directory, "weights_rewind.npz"), _weights(model))
    stream = iter(index_stream(len(self.dataset.x_train), hp.batch_size,
                               derived_seed(hp.seed, trial, "data"), iteration))
    percent = pruning.percent_remaining(masks)
    bar = tqdm(total=hp.train_iters - start, initial=iteration - start,
               desc=f"trial {trial} prune_iter {level} ({percent:.1f}%)",
               disable=not self.progress, leave=False, dynamic_ncols=True)
    chunk_start = iteration
    train_sums = np.zeros(len(METRICS))
    for stop in stops:
      if stop <= iteration:
        continue
      means = trainer.train(stream, stop - iteration)
      train_sums += np.array([means[m] for m in METRICS]) * (stop - iteration)
      bar.update(stop - iteration)
      iteration = stop
      if record_rewind and stop == hp.rewind_iteration:
        files.save_arrays(os.path.join(directory, "weights_rewind.npz"), _weights(model))
      if stop in eval_points:
        row = {"iteration": stop}
        row.update({m: float(s) / (stop - chunk_start) for m, s in zip(METRICS, train_sums)})
        logs["train"].append(row)
        chunk_start, train_sums = stop, np.zeros(len(METRICS))
        test = self._evaluate(trainer, logs, stop)
        bar.set_postfix(acc=f"{test['acc']:.4f}", adv_acc=f"{test['adv_acc']:.4f}")
        self._checkpoint(directory, trainer, logs)
    bar.close()
    self._finish(directory, trial, level, layers, model, masks, logs, began)

  def _evaluate(self, trainer, logs, iteration):
    results = {}
    for split, stream in (("valid", 1), ("test", 2)):
      x = getattr(self.dataset, f"x_{split}")
      y = getattr(self.dataset, f"y_{split}")
      results[split] = dict(iteration=iteration, **trainer.evaluate(x, y, stream))
      logs[split].append(results[split])
    return results["test"]

  def _checkpoint(self, directory, trainer, logs):
    state = {f"v{i}": value for i, value in enumerate(trainer.get_state())}
    state["logs"] = np.frombuffer(json.dumps(logs).encode(), np.uint8)
    files.save_arrays(os.path.join(directory, "checkpoint.npz"), state)
    self._write_csvs(directory, logs)

  def _write_csvs(self, directory, logs):
    for split in SPLITS:
      files.write_csv(os.path.join(directory, f"{split}.csv"), COLUMNS, logs[split])

  def _finish(self, directory, trial, level, layers, model, masks, logs, began):
    self._write_csvs(directory, logs)
    _save_layer_arrays(directory, "post_kernels", _kernels(layers))
    files.save_arrays(os.path.join(directory, "weights_final.npz"), _weights(model))
    remaining = int(sum(m.sum() for m in masks.values()))
    total = int(sum(m.size for m in masks.values()))
    files.write_json(os.path.join(directory, "metadata.json"), {
        "trial": trial,
        "prune_iteration": level,
        "percent_weights_remaining": 100.0 * remaining / total,
        "weights_remaining": remaining,
        "weights_total": total,
        "layer_weights_remaining": {name: int(m.sum()) for name, m in masks.items()},
        "final_iteration": self.hparams.train_iters,
        "completed": True,
        "seconds": time.time() - began,
    })
    os.remove(os.path.join(directory, "checkpoint.npz"))
