"""phd-lab's measurements of a network's layers (spec section 5) as experiments.

`--experiment=receptive_field` builds `--model` for `--dataset`'s images and
writes, to its run folder, `receptive_field.csv` (`;Layer;map_size;start;jump;
receptive_field`, spec 5.5: conv and max-pool layers in call order, skip paths
ignored) and `computational_info.json` (MACs, FLOPs, parameters; an analytic
count of the conv and dense layers). It trains nothing.

`computational_info.json` is phd-lab's: "flops", "macs", "params" and
"total flops" = macs * 2 * 3 * samples * epochs, where samples is what
phd-lab counts per epoch, its training loader's batches times the nominal
batch size (50048 = 782 x 64 for CIFAR-10 at batch 64), and epochs is
`--epochs` (phd-lab's 30 when unset).

`--experiment=probes --pretrained_run=DIR` fits a linear probe on the output
of every conv and dense layer of the finished run DIR (its trial 0, level 0):
the latents of the training set (training mode unless
`--noprobe_train_mode`; read as phd-lab's training loader gives it:
shuffled, augmented with `--augment`, in batches of `--probe_batch_size`,
default `--batch_size`; `--noprobe_augment`: un-augmented, in order) and
of the test set (inference mode), adaptive-average-
pooled to DxD for each D of `--probe_pool`, stored as `.npy` under
`latents_<D>/`, then scikit-learn's multinomial saga logistic regression per
layer (`--probe_jobs` in parallel), cached per layer, so a re-run fits only
what is missing. Results: `<D>x<D>_probe_performances.csv`
(`;name;train_acc;eval_acc`, the seed's format) in the run folder.

`--probes` does the same after any training run, on trial 0's final network
(last level), into the run folder. Saturation, the third measurement, runs
during training (`--measure`).
"""

import math
import os

import numpy as np
import tensorflow as tf

from robust_sparse.data import augment as augment_lib
from robust_sparse.experiments.registry import EXPERIMENTS, Measurement
from robust_sparse.core import files
from robust_sparse.core.run_folder import finished_run
from robust_sparse.models import normalization_mean
from robust_sparse.nn.weights import assign_weights
from robust_sparse.measure import probes as probes_lib
from robust_sparse.measure import receptive_field as receptive_field_lib


# phd-lab's DEFAULT_CONFIG epochs (the paper's configs: 30, 60 for resnet50).
PHD_LAB_EPOCHS = 30


def phd_lab_samples(num_train: int, batch_size: int) -> int:
  """Training samples per epoch as phd-lab counts them: len(train loader) x batch size."""
  return math.ceil(int(num_train) / int(batch_size)) * int(batch_size)


@EXPERIMENTS.register("receptive_field")
class ReceptiveField(Measurement):
  """Receptive fields and compute cost of `--model` (trains nothing)."""

  def after_run(self, runner):
    model = runner.build(0, 0)
    rows = receptive_field_lib.receptive_fields(model)
    path = os.path.join(runner.run_dir, "receptive_field.csv")
    receptive_field_lib.write_receptive_field_csv(path, rows)
    hp = self.hparams
    info = receptive_field_lib.computational_info(
        model, n_samples=phd_lab_samples(runner.num_train, hp.batch_size),
        epochs=int(hp.epochs or PHD_LAB_EPOCHS))
    files.write_json(os.path.join(runner.run_dir, "computational_info.json"), info)
    return f"receptive field of the last conv layer: {rows[-1].receptive_field}"


@EXPERIMENTS.register("probes")
class Probes(Measurement):
  """Linear probes on every layer of a finished run (see the module docstring)."""

  def check(self, dataset, num_train):
    hp = self.hparams
    if not hp.pretrained_run:
      raise ValueError("probes needs --pretrained_run=DIR, the finished run to probe")
    _, self._weights = finished_run(
        hp.pretrained_run, "--pretrained_run", matches=hp,
        fields=("model", "dataset", "resolution", "normalize", "activation", "dropout"))
    check_probe_settings(hp, dataset)

  def after_run(self, runner):
    hp = self.hparams
    model = runner.build(0, 0)
    assign_weights(model, self._weights, f"--pretrained_run={hp.pretrained_run}")
    return fit_probes(hp, model, runner.dataset, runner.run_dir)


def check_probe_settings(hp, dataset):
  """Raises ValueError (naming the flag) for probes this data set or pool cannot have."""
  if dataset.decode is not None or dataset.prepare is not None:
    raise ValueError(f"probes read in-memory images at their stored size; --dataset="
                     f"{hp.dataset} with --resolution={hp.resolution} is not supported yet")
  for pool in hp.probe_pool:
    if pool != int(pool) or pool < 1:
      raise ValueError(f"--probe_pool={','.join(map(str, hp.probe_pool))}: sizes must be "
                       "integers >= 1")


def probe_training_batches(hp, dataset):
  """The training set as the probes read it: `(batches, count, source)`.

  With `--probe_augment` (default), phd-lab's training loader: a shuffled
  permutation of every training example (seeded by `--seed`), batches of
  `--probe_batch_size` (default `--batch_size`) with a smaller last one, each
  augmented with `--augment` under its own stateless seed. Otherwise the
  arrays in order, in batches of 256.
  """
  if not hp.probe_augment:
    return (dataset.x_train, dataset.y_train), len(dataset.y_train), {"augment": None}
  batch_size = int(hp.probe_batch_size or hp.batch_size)
  augment = augment_lib.build(hp.augment, num_classes=dataset.num_classes,
                              fill=normalization_mean(hp.normalize))
  count = len(dataset.y_train)
  order = np.random.default_rng([hp.seed, 4]).permutation(count)

  def batches():
    for index, start in enumerate(range(0, count, batch_size)):
      chosen = order[start:start + batch_size]
      x = tf.convert_to_tensor(np.asarray(dataset.x_train[chosen], np.float32))
      y = tf.convert_to_tensor(np.asarray(dataset.y_train[chosen]))
      if augment is not None:
        x, y = augment(x, y, tf.constant([hp.seed, index], tf.int64))
      yield x, y

  source = {"augment": hp.augment, "batch_size": batch_size, "seed": hp.seed}
  return batches(), count, source


def fit_probes(hp, model, dataset, out_dir) -> str:
  """Latents and probes of every layer of `model` for each `--probe_pool`, into `out_dir`.

  Returns:
    One line per pool size: the last layer's probe accuracies.
  """
  def extract(folder, pool):
    data, count, source = probe_training_batches(hp, dataset)
    probes_lib.extract_latents(model, data, folder, split="train", pool=pool,
                               training=hp.probe_train_mode, num_examples=count,
                               source=source)
    probes_lib.extract_latents(model, (dataset.x_test, dataset.y_test), folder,
                               split="eval", pool=pool, training=False)

  lines = []
  for pool in (int(p) for p in hp.probe_pool):
    folder = os.path.join(out_dir, f"latents_{pool}")
    try:
      extract(folder, pool)
    except ValueError as e:
      raise ValueError(f"--probe_pool={pool}: {e}") from None
    csv = os.path.join(out_dir, probes_lib.probe_csv_name(pool))
    table = probes_lib.train_probes(folder, output_csv=csv, n_jobs=hp.probe_jobs)
    last = table.iloc[-1]
    lines.append(f"{pool}x{pool} probe of {last['name']}: train {last['train_acc']:.4f}, "
                 f"eval {last['eval_acc']:.4f}")
  if hp.pixelwise_probes:
    folder = os.path.join(out_dir, "latents_full")
    extract(folder, None)
    probes_lib.train_pixelwise_probes(
        folder, output_csv=os.path.join(out_dir, probes_lib.probe_csv_name(None)),
        n_jobs=hp.probe_jobs)
    lines.append("pixel-wise probes: pixelwise_probe_performances.csv")
  files.write_json(os.path.join(out_dir, "probes.json"),
                   {"source": hp.pretrained_run or out_dir,
                    "pools": [int(p) for p in hp.probe_pool],
                    "train_mode": hp.probe_train_mode, "augment": hp.probe_augment,
                    "batch_size": (int(hp.probe_batch_size or hp.batch_size)
                                   if hp.probe_augment else 256),
                    "pixelwise": hp.pixelwise_probes})
  return "\n".join(lines)
