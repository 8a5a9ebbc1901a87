"""What one level of a run writes: its log (CSV rows, TensorBoard, checkpointed rows),
its layer arrays and its `metadata.json`.

A level's folder (`run_folder.level_dir(run_dir, trial, level)`):

  train.csv valid.csv test.csv   iteration,loss,acc,adv_acc,nat_loss,adv_loss,epoch,lr[,top5]
                                 (train.csv also sharpness,m_sharpness)
  masks/<layer>.npy              0/1 masks the level trained with
  init_kernels/<layer>.npy       kernels at the start of the level
  post_kernels/<layer>.npy       kernels at the end of the level
  weights_init.npz weights_final.npz [weights_rewind.npz]
                                 every model variable by path (trainable or
                                 not: batch-norm statistics, masks, counters)
  masking.json masking_examples.npz
                                 --masking_checks: the gradient-masking checks'
                                 attacks on the final network (experiments/masking_checks.py)
  eps_sweep.json                 --eps_sweep: robust accuracy at each budget (experiments/eps_sweep.py)
  checkpoint.npz                 while the level runs: every variable of the engine, and the rows
  metadata.json                  written last: the level is finished (or diverged)
"""

import json
import os
import socket
import time

import numpy as np

from robust_sparse.core import files
from robust_sparse.core.run_folder import METADATA_FILE
from robust_sparse.measure import saturation as saturation_lib
from robust_sparse.training import tensorboard
from robust_sparse.training.steps import METRICS

SPLITS = ("train", "valid", "test")
SHARPNESS = ("sharpness", "m_sharpness")
CHECKPOINT_FILE = "checkpoint.npz"


def columns(top5: bool, sharpness: bool = False):
  """CSV columns: the seed's first, then the engine's additions (train: sharpness)."""
  return (("iteration",) + tuple(m for m in METRICS if m != "top5") + ("epoch", "lr")
          + (("top5",) if top5 else ()) + (SHARPNESS if sharpness else ()))


def row(names, iteration: int, metrics, *, steps_per_epoch: int, learning_rates):
  """A CSV row of `names`: the iteration, `metrics`, the epoch and the weights' rate."""
  values = {"iteration": iteration, **metrics, "epoch": round(iteration / steps_per_epoch, 6)}
  values["lr"] = learning_rates.get("weights", next(iter(learning_rates.values())))
  return {c: values[c] for c in names if c in values}


# ---- layer arrays ------------------------------------------------------------------
def kernels(layers):
  """{layer name: its kernel} of masked layers."""
  return {layer.name: np.asarray(layer.raw_kernel.numpy()) for layer in layers}


def save_layer_arrays(directory, sub, arrays):
  for name, array in arrays.items():
    files.save_npy(os.path.join(directory, sub, f"{name}.npy"), array)


def load_layer_arrays(directory, sub, names):
  return {name: np.load(os.path.join(directory, sub, f"{name}.npy")) for name in names}


class LevelLog:
  """The rows of one level by split, kept in its checkpoint and written as CSVs and
  TensorBoard scalars.

  Args:
    run_dir, directory, trial, level: the run folder and the level's folder.
    columns, train_columns: the CSV columns of valid/test and of train.

  Attributes:
    rows: {split: [row]}; experiments may add lists of their own (checkpointed too).
  """

  def __init__(self, run_dir, directory, trial, level, columns, train_columns):
    self.directory = directory
    self.columns, self.train_columns = columns, train_columns
    self.checkpoint = os.path.join(directory, CHECKPOINT_FILE)
    self.rows = {split: [] for split in SPLITS}
    self.tensorboard = tensorboard.LevelWriter(run_dir, trial, level,
                                               fresh=not os.path.exists(self.checkpoint))

  def resume(self, engine) -> bool:
    """Restores the rows and `engine`'s state from the checkpoint; False without one."""
    if not os.path.exists(self.checkpoint):
      return False
    state = files.load_arrays(self.checkpoint)
    self.rows = json.loads(state.pop("logs").tobytes().decode())
    engine.set_state(state)
    return True

  def add(self, split, values):
    """Appends a row of `split` (valid and test reach TensorBoard at once; train with
    `write_train`, once the evaluation has completed it)."""
    self.rows[split].append(values)
    if split != "train":
      self.tensorboard.write_row(split, values)

  def write_train(self, values):
    self.tensorboard.write_row("train", values)

  def save(self, engine):
    """The checkpoint (every variable of `engine`, and the rows), the CSVs, TensorBoard."""
    state = engine.get_state()
    state["logs"] = np.frombuffer(json.dumps(self.rows).encode(), np.uint8)
    files.save_arrays(self.checkpoint, state)
    self.write_csvs()
    self.tensorboard.flush()

  def write_csvs(self):
    for split in SPLITS:
      names = self.train_columns if split == "train" else self.columns
      files.write_csv(os.path.join(self.directory, f"{split}.csv"), names, self.rows[split])

  def close(self):
    """The CSVs and TensorBoard, finally."""
    self.write_csvs()
    self.tensorboard.close()

  def diverged(self, trial, level, iteration):
    """Keeps the rows up to the last finite evaluation and marks the level diverged."""
    self.close()
    files.write_json(os.path.join(self.directory, METADATA_FILE), {
        "trial": trial, "prune_iteration": level, "completed": False, "diverged": True,
        "diverged_iteration": iteration})
    if os.path.exists(self.checkpoint):
      os.remove(self.checkpoint)

  def finish(self, trial, level, masks, iteration, began, compile_mode, extra):
    """`metadata.json` of a finished level (after `close`), then the checkpoint goes.

    Args:
      masks: {layer: 0/1 mask} the level trained with.
      began: its `time.time()` at the start.
      extra: the experiment's own fields.
    """
    remaining = int(sum(m.sum() for m in masks.values()))
    total = int(sum(m.size for m in masks.values()))
    files.write_json(os.path.join(self.directory, METADATA_FILE), {
        "trial": trial,
        "prune_iteration": level,
        "percent_weights_remaining": 100.0 * remaining / total,
        "weights_remaining": remaining,
        "weights_total": total,
        "layer_weights_remaining": {name: int(m.sum()) for name, m in masks.items()},
        "final_iteration": iteration,
        "completed": True,
        "seconds": time.time() - began,
        "compile": compile_mode,
        # What each log must hold: the analysis refuses a level whose files disagree.
        "files": {f"{split}.csv": files.csv_record(os.path.join(self.directory,
                                                                f"{split}.csv"))
                  for split in SPLITS},
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        **extra,
    })
    os.remove(self.checkpoint)

  def write_phd_lab_csv(self, hp, image_size: int, num_train: int):
    """`--phd_lab_csv`: the last evaluation period as the seed's per-epoch CSV row."""
    train, test = self.rows["train"][-1], self.rows["test"][-1]
    values = {"training_accuracy": train["acc"], "training_top5-accuracy": train.get("top5"),
              "training_loss": train["loss"], "test_accuracy": test["acc"],
              "test_top5-accuracy": test.get("top5"), "test_loss": test["nat_loss"]}
    values.update({k: v for k, v in train.items() if "saturation_" in k
                   or "intrinsic-dimensionality_" in k})
    name = saturation_lib.phd_lab_csv_name(
        hp.model, hp.dataset, image_size, hp.batch_size,
        int(round(hp.total_iterations(num_train) / hp.steps_per_epoch(num_train))))
    saturation_lib.write_phd_lab_csv(os.path.join(self.directory, name),
                                     len(self.rows["train"]) - 1, values)
