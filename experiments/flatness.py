"""Augmented flatness along a finished run (spec 2.3) as an experiment.

`--experiment=augmented_flatness --pretrained_run=DIR` measures every
checkpoint of the finished run DIR (its trial 0, level 0, in iteration order:
`weights_init.npz`, the weights `--save_every_epochs` saved, and
`weights_final.npz`; see `robust_sparse.core.run_folder.checkpoints`). For each, it
loads the weights into `--model` (which, with `--dataset`, must be DIR's) and
computes `robust_sparse.measure.flatness.augmented_flatness` in batches of
`--batch_size`, at most `--max_iterations` of them, the loss counting only the
correctly classified samples with `--correct_samples_only` (whose gradient
terms are then divided by the accuracy, as the seed's notebook does).

`--flatness_data=train` (default) is the seed's protocol (cdgyp/sparsity,
`augmented_flatness_cifar10.sh`: the training loader, `model.train()`,
learning rate 0 and weight decay 0): one epoch (or `--max_iterations`
batches) of training batches in the engine's order for `--seed`, each
prepared and augmented by `--augment` as a training step would see it (full
batches only, as its `drop_last`), the model in training mode, the loss the
batch mean of the cross-entropy with `--label_smoothing`, times
`--flatness_loss_scale` (its AMP scale 65536 gives the logged values).
`--flatness_data=test` is the toolkit's earlier measurement: the test set in
order, inference mode, each sample's own plain cross-entropy. Nothing is
trained; it writes, in its own run folder:

  augmented_flatness/iteration_<iteration>.csv
                          one per checkpoint: `block,term,value` rows
                          (`flatness.write_csv`), every MLP block, the
                          average over blocks and the measurement summary
  augmented_flatness.csv  one row per checkpoint: iteration, epoch (of DIR),
                          batches, samples, accuracy, then `<block>/<term>`
                          for the average (`average/key`, `average/value`,
                          `average/L0_preview`, `average/L2`, ...) and each block
  augmented_flatness.png  the paper's figure: average key, value, L0 and L2
                          coefficients against the iteration, log y

Each checkpoint's CSV is written atomically and a checkpoint whose CSV
exists is not measured again, so re-running a killed command measures only
the missing ones; the summary and the figure are rebuilt from the CSVs. It
prints, last, `augmented flatness: N checkpoints, average key A0 -> A1, value
V0 -> V1` (first and last checkpoint; a model whose blocks have no value
layer, such as `residual_mlp`, has no value term).
"""

import csv
import dataclasses
import math
import os
import tempfile

import tensorflow as tf
from absl import logging

from robust_sparse.data import augment as augment_lib
from robust_sparse.experiments.registry import EXPERIMENTS, Measurement
from robust_sparse.core import files
from robust_sparse.measure import flatness as flatness_lib
from robust_sparse.core.hparams import ModelHparams
from robust_sparse.core.run_folder import checkpoints, finished_run, level_dir
from robust_sparse.core.streams import Stream
from robust_sparse.models import normalization_mean
from robust_sparse.nn.weights import assign_weights
from robust_sparse.training.engine import index_stream
from robust_sparse.training.steps import stream_seed

FOLDER = "augmented_flatness"
SUMMARY_CSV = "augmented_flatness.csv"
FIGURE = "augmented_flatness.png"
# The source run's fields that fix the model's variables and what it sees: the
# data set and every model field (the model options too) but the L1 penalty.
MATCHED = ("dataset", "resolution") + tuple(
    field.name for field in dataclasses.fields(ModelHparams) if field.name != "l1_reg")


def checkpoint_csv(run_dir, iteration) -> str:
  """Where the measurement of the checkpoint at `iteration` is written."""
  return os.path.join(run_dir, FOLDER, f"iteration_{iteration:08d}.csv")


def evaluation_batches(dataset, batch_size: int, seed: int) -> tf.data.Dataset:
  """The test set as the model sees it, in order: (x, y) batches of `batch_size`.

  Files are decoded with `decode_eval` and batches prepared (resizing, ...)
  with a fixed seed per batch, so every checkpoint sees the same inputs.
  """
  batches = tf.data.Dataset.from_tensor_slices((dataset.x_test, dataset.y_test))
  decode = dataset.decode_eval or dataset.decode
  if decode is not None:
    batches = batches.map(lambda path, label: (decode(path), label),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  batches = batches.batch(batch_size)
  if dataset.prepare is not None:
    prepare = dataset.prepare
    batches = batches.enumerate().map(
        lambda index, batch: (prepare(batch[0], stream_seed(seed, 0, Stream.TEST_PREPARE,
                                                            index)), batch[1]))
  return batches.prefetch(tf.data.AUTOTUNE)


def training_batches(dataset, batch_size: int, seed: int, augment=None,
                     max_iterations=None) -> tf.data.Dataset:
  """Training batches as the engine's steps see them: (x, y) of `batch_size`, one epoch.

  Batch i holds the indices the engine's stream gives iteration i for `seed`
  (`engine.index_stream`), decoded, prepared (`Stream.TRAIN_PREPARE`) and
  augmented (`Stream.AUGMENT`) with that iteration's seeds; soft labels where the augmentation
  mixes them. Full batches only: floor(n / batch_size) of them, or
  `max_iterations`.
  """
  steps = len(dataset.y_train) // batch_size
  if max_iterations is not None:
    steps = min(steps, max_iterations)
  if steps < 1:
    raise ValueError(f"--batch_size={batch_size} is larger than the {len(dataset.y_train)} "
                     "training examples: augmented_flatness measures full batches")
  x_train = tf.convert_to_tensor(dataset.x_train)
  y_train = tf.convert_to_tensor(dataset.y_train)
  decode = dataset.decode

  def load(iteration, indices):
    x = tf.gather(x_train, indices)
    if decode is not None:
      x = tf.map_fn(decode, x, fn_output_signature=tf.float32)
    y = tf.gather(y_train, indices)
    if dataset.prepare is not None:
      x = dataset.prepare(x, stream_seed(seed, iteration, Stream.TRAIN_PREPARE))
    if augment is not None:
      x, y = augment(x, y, stream_seed(seed, iteration, Stream.AUGMENT))
    return x, y

  return (index_stream(len(dataset.y_train), batch_size, seed).take(steps).enumerate()
          .map(load).prefetch(2))


def _write_results_atomically(results, path):
  """`flatness.write_csv` into a temporary file beside `path`, then renamed into place."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-",
                                       suffix=".csv")
  os.close(handle)
  try:
    flatness_lib.write_csv(results, temporary)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def _steps_per_epoch(level_directory):
  """Iterations per epoch of a finished level, from its train.csv (iteration / epoch)."""
  try:
    with open(os.path.join(level_directory, "train.csv"), newline="") as handle:
      rows = list(csv.DictReader(handle))
  except OSError:
    return None
  for row in reversed(rows):
    try:
      iteration, epoch = float(row["iteration"]), float(row["epoch"])
    except (KeyError, TypeError, ValueError):
      continue
    if iteration > 0 and epoch > 0:
      return max(1, round(iteration / epoch))
  return None


def summary_columns(measured):
  """The summary CSV's columns for {iteration: results}."""
  columns = ["iteration", "epoch"] + list(flatness_lib.SUMMARY_TERMS)
  for results in measured.values():
    blocks = [flatness_lib.AVERAGE] + [b for b in results if b not in (
        flatness_lib.AVERAGE, flatness_lib.SUMMARY)]
    for block in blocks:
      for term in flatness_lib.TERMS:
        column = f"{block}/{term}"
        if term in results.get(block, {}) and column not in columns:
          columns.append(column)
  return columns


def summary_rows(measured, steps_per_epoch):
  """One row per checkpoint (iteration order): iteration, epoch, summary, every term."""
  rows = []
  for iteration in sorted(measured):
    results = measured[iteration]
    row = {"iteration": iteration,
           "epoch": (round(iteration / steps_per_epoch, 6) if steps_per_epoch
                     else math.nan)}
    row.update(results.get(flatness_lib.SUMMARY, {}))
    for block, terms in results.items():
      if block != flatness_lib.SUMMARY:
        row.update({f"{block}/{term}": value for term, value in terms.items()})
    rows.append(row)
  return rows


def _save_figure(measured, path, title):
  """The log-y figure, written atomically; returns None or why there is none."""
  try:
    figure = flatness_lib.plot_augmented_flatness(measured, None, xlabel="iteration",
                                                  title=title)
  except ValueError as e:
    return str(e)
  with files.atomic_open(path, "wb") as handle:
    figure.savefig(handle, format="png")
  return None


def _change(measured, term):
  """`A0 -> A1` of the average `term` from the first to the last checkpoint, or None."""
  first, last = measured[min(measured)], measured[max(measured)]
  average = flatness_lib.AVERAGE
  if term not in first.get(average, {}):
    return None
  return f"{first[average][term]:.4g} -> {last[average][term]:.4g}"


@EXPERIMENTS.register("augmented_flatness")
class AugmentedFlatness(Measurement):
  """Augmented flatness of every checkpoint of a finished run (see the module docstring)."""

  def check(self, dataset, num_train):
    hp = self.hparams
    if hp.max_iterations is not None and hp.max_iterations < 1:
      raise ValueError(f"--max_iterations must be >= 1 (unset: one epoch or the whole test "
                       f"set), got {hp.max_iterations}")
    if not hp.flatness_loss_scale > 0:
      raise ValueError(f"--flatness_loss_scale must be positive, got {hp.flatness_loss_scale}")
    if not hp.pretrained_run:
      raise ValueError("augmented_flatness needs --pretrained_run=DIR, the finished run whose "
                       "checkpoints to measure")
    self._source, _ = finished_run(hp.pretrained_run, "--pretrained_run", matches=hp,
                                   fields=MATCHED)
    self._level = level_dir(hp.pretrained_run, 0, 0)
    by_iteration = {}
    for iteration, path in checkpoints(self._level):
      if iteration is not None:  # The first file of an iteration wins (init at 0).
        by_iteration.setdefault(iteration, path)
    self._checkpoints = sorted(by_iteration.items())
    if not self._checkpoints:
      raise ValueError(f"--pretrained_run={hp.pretrained_run}: trial_0/prune_iter_0 has no "
                       "weights to measure")

  def after_run(self, runner):
    hp = self.hparams
    model = runner.build(0, 0)
    try:
      blocks = flatness_lib.mlp_blocks(model)
    except ValueError:
      raise ValueError(f"--model={hp.model} has no MLP block (a dense layer feeding an "
                       "activation layer) for augmented_flatness to measure; e.g. "
                       "--model=residual_mlp or a vit") from None
    logging.info("augmented flatness of blocks %s", ", ".join(b.name for b in blocks))
    seed_protocol = hp.flatness_data == "train"
    if seed_protocol:
      augment = augment_lib.build(hp.augment, num_classes=runner.dataset.num_classes,
                                  fill=normalization_mean(hp.normalize))
      batches = training_batches(runner.dataset, hp.batch_size, hp.seed, augment,
                                 hp.max_iterations)
      protocol = dict(training=True, loss_reduction="mean",
                      label_smoothing=hp.label_smoothing,
                      loss_scale=hp.flatness_loss_scale)
    else:
      batches = evaluation_batches(runner.dataset, hp.batch_size, hp.seed)
      protocol = dict(training=False, loss_reduction="sum", label_smoothing=0.0,
                      loss_scale=hp.flatness_loss_scale)
    measured, computed = {}, 0
    for iteration, path in self._checkpoints:
      target = checkpoint_csv(runner.run_dir, iteration)
      if os.path.exists(target):
        measured[iteration] = flatness_lib.read_csv(target)
        continue
      try:
        assign_weights(model, files.load_arrays(path), "the checkpoint")
      except (TypeError, ValueError) as e:  # Missing variables or other shapes.
        raise ValueError(f"--pretrained_run={hp.pretrained_run}: {os.path.basename(path)} "
                         f"does not fit --model={hp.model}: {str(e).splitlines()[0]}") from None
      results = flatness_lib.augmented_flatness(
          model, batches, correct_samples_only=hp.correct_samples_only,
          max_iterations=hp.max_iterations, **protocol)
      _write_results_atomically(results, target)
      measured[iteration] = flatness_lib.read_csv(target)
      computed += 1
    logging.info("augmented flatness: measured %d checkpoints, %d were measured before",
                 computed, len(measured) - computed)

    columns = summary_columns(measured)
    rows = summary_rows(measured, _steps_per_epoch(self._level))
    files.write_csv(os.path.join(runner.run_dir, SUMMARY_CSV), columns,
                    [{c: row.get(c, math.nan) for c in columns} for row in rows])
    no_figure = _save_figure(measured, os.path.join(runner.run_dir, FIGURE),
                             f"{self._source.model} on {self._source.dataset}")

    line = (f"augmented flatness: {len(measured)} checkpoints, average key "
            f"{_change(measured, 'key')}")
    value = _change(measured, "value")
    line += f", value {value}" if value else " (no value layers)"
    if len(measured) <= 2:
      line += ("; only the initial and final weights: train with --save_every_epochs=N "
               "for more points")
    if no_figure:
      line += f"; no figure: {no_figure}"
    return line
