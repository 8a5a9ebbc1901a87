"""Runs an experiment's trials and pruning levels on the engine, writing the run folder.

Layout (`run_dir = hparams.run_dir(base_dir)`):

  hparams.json
  trial_<t>/prune_iter_<k>/
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
    metadata.json                  written last: the level is finished (or diverged)

Each stage checks for its own output first: finished levels are skipped, and an
interrupted level resumes from `checkpoint.npz` (every variable of the model,
the optimizers and the engine, written atomically after every evaluation), so
re-running a killed command finishes it with the same numbers. A level whose
loss becomes NaN or infinite stops at once, keeps its CSVs and says `diverged`
in `metadata.json`; re-running it is refused until `--force`.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import time
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tqdm import tqdm

from robust_sparse.attacks import make_attack
from robust_sparse.data import augment as augment_lib
from robust_sparse.experiments import build, eps_sweep, masking_checks
from robust_sparse.experiments.phd_lab import check_probe_settings, fit_probes
from robust_sparse.experiments.registry import EXPERIMENTS, Defaults
from robust_sparse.models import build_model, normalization_mean
from robust_sparse.core import claims, files
from robust_sparse.training import distribute
from robust_sparse.nn import pruning, sparsity_modules
from robust_sparse.training.sharpness import ssam
from robust_sparse.measure import measurements as measurements_lib
from robust_sparse.measure import saturation as saturation_lib
from robust_sparse.training import tensorboard
from robust_sparse.training.engine import Diverged, Engine, index_stream
from robust_sparse.core.hparams import Hparams
from robust_sparse.core.run_folder import (LevelHistory, checkpoint_path, derived_seed,
                                           finished_run, is_finished, level_dir, read_metadata)
from robust_sparse.nn.layers import masked_layers
from robust_sparse.nn.weights import assign_weights, model_weights
from robust_sparse.training.optimizers import make_optimizer, split_optimizer
from robust_sparse.training.sharpness.sam import check_options as check_sharpness_options
from robust_sparse.training.sharpness.sam import sharpness_aware
from robust_sparse.training.sharpness.sparse_perturbation import DynamicMasks, FisherMasks
from robust_sparse.training.schedules import make_schedule
from robust_sparse.training.steps import (METRICS, LossScale, OptimizerGroup, cross_entropy,
                                 loss_and_gradients, standard_loss_grad_fn)

SPLITS = ("train", "valid", "test")
# The evaluated splits, in order, with the attack's random stream of each
# (`Engine.evaluate`).
EVAL_STREAMS = (("valid", 1), ("test", 2))
# How often a process that has nothing left to claim looks again (levels held by others).
CLAIM_POLL_SECONDS = 2.0


class DivergedError(RuntimeError):
  """A level's loss became NaN or infinite (now or in an earlier run of the command)."""


SHARPNESS = ("sharpness", "m_sharpness")


def columns(top5: bool, sharpness: bool = False):
  """CSV columns: the seed's first, then the engine's additions (train: sharpness)."""
  return (("iteration",) + tuple(m for m in METRICS if m != "top5") + ("epoch", "lr")
          + (("top5",) if top5 else ()) + (SHARPNESS if sharpness else ()))


def _kernels(layers):
  return {layer.name: np.asarray(layer.raw_kernel.numpy()) for layer in layers}


def _save_layer_arrays(directory, sub, arrays):
  for name, array in arrays.items():
    files.save_npy(os.path.join(directory, sub, f"{name}.npy"), array)


def _load_layer_arrays(directory, sub, names):
  return {name: np.load(os.path.join(directory, sub, f"{name}.npy")) for name in names}


def set_precision(mixed_precision: bool):
  keras.mixed_precision.set_global_policy("mixed_float16" if mixed_precision else "float32")


def load_teacher(run_dir: str, input_shape, num_classes) -> keras.Model:
  """The final model of trial 0, level 0 of the finished run folder `run_dir`.

  Raises:
    ValueError: not a run folder, or its level 0 is unfinished or does not fit.
  """
  teacher_hp, weights = finished_run(run_dir, "--teacher_dir")
  model = build_model(teacher_hp.model, input_shape, num_classes,
                      activation=teacher_hp.activation, normalize=teacher_hp.normalize,
                      dropout=teacher_hp.dropout, **teacher_hp.model_options())
  assign_weights(model, weights, f"--teacher_dir={run_dir}")
  model.trainable = False
  return model


def optimizer_groups(hp: Hparams, num_train: int):
  """The weights' optimizer group from the hyper-parameters (one group, "weights")."""
  _, base = split_optimizer(hp.optimizer)
  optimizer = make_optimizer(base, hp.learning_rate, momentum=hp.momentum,
                             nesterov=hp.nesterov, weight_decay=hp.weight_decay)
  schedule = make_schedule(
      hp.lr_schedule, hp.learning_rate, total_iterations=hp.total_iterations(num_train),
      steps_per_epoch=hp.steps_per_epoch(num_train), per=hp.schedule_per,
      eta_min=hp.eta_min, milestones=hp.milestones, gamma=hp.gamma,
      lr_step_epochs=hp.lr_step_epochs, warmup_epochs=hp.warmup_epochs,
      warmup_init_lr=hp.warmup_init_lr)
  return [OptimizerGroup("weights", optimizer, schedule)]


def sharpness_wrapper(hp: Hparams, model, masks=None):
  """`LossGradFn -> LossGradFn` for `--optimizer=<perturbation>-<base>`, else None.

  Args:
    masks: SSAM's `PerturbationMasks` (their current values restrict `e`).
  """
  perturbation, _ = split_optimizer(hp.optimizer)
  if perturbation is None:
    return None
  values = masks.values if masks is not None else None
  return lambda inner: sharpness_aware(
      inner, model, rho=hp.rho, adaptive=perturbation == "asam", eta=hp.asam_eta,
      asam_rule=hp.asam_rule, ssam_norm=hp.ssam_norm, bn_stats=hp.sam_bn_stats,
      batch_splits=hp.sam_batch_splits,
      mask_fn=None if hp.implicit else values,
      implicit_mask_fn=values if hp.implicit else None, sync=hp.sam_sync)


def has_perturbation_masks(hp: Hparams) -> bool:
  """SSAM-F, SSAM-D or implicit sparse perturbation: masks refreshed during training."""
  return split_optimizer(hp.optimizer)[0] in ("ssamf", "ssamd") or hp.implicit


def perturbation_masks(hp: Hparams, model, num_classes, augment, num_train):
  """SSAM-F / implicit (Fisher) or SSAM-D masks when `has_perturbation_masks`, else None."""
  perturbation, _ = split_optimizer(hp.optimizer)
  if perturbation == "ssamf" or hp.implicit:
    return FisherMasks(model, cross_entropy(num_classes, hp.label_smoothing), augment=augment,
                       num_samples=hp.num_samples, sparsity=hp.sparsity, pattern=hp.pattern,
                       n=hp.n_structured, m=hp.m_structured,
                       nm_conv_layout=hp.nm_conv_layout, update_freq=hp.update_freq,
                       implicit=hp.implicit)
  if perturbation == "ssamd":
    base = loss_and_gradients(model, cross_entropy(num_classes, hp.label_smoothing))

    @tf.function
    def clean_grads(x, y):
      weight = tf.fill([tf.shape(y)[0]], 1.0 / tf.cast(tf.shape(y)[0], tf.float32))
      grads, _, _ = base([tf.convert_to_tensor(v.value) for v in model.trainable_variables],
                         [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables],
                         dict(x=x, y=y, weight=weight, seed=tf.zeros([2], tf.int64)))
      return grads

    epochs = hp.total_iterations(num_train) / hp.steps_per_epoch(num_train)
    return DynamicMasks(model, clean_grads, sparsity=hp.sparsity, epochs=epochs,
                        drop_rate=hp.drop_rate, drop_strategy=hp.drop_strategy,
                        growth_strategy=hp.growth_strategy, update_freq=hp.update_freq)
  return None


MEASUREMENTS = measurements_lib.MEASUREMENTS


def make_measurement(hp: Hparams, model):
  """The `--measure` measurements of `model` for the engine, or None.

  One `measurements.Measurements` for the whole list: saturation (a
  `saturation.SaturationTracker` of every conv and dense layer) and the
  activation measurements (`activation_stats.ActivationStatistics` of every
  activation layer, training steps every `--log_every`), behind one
  weight-sharing tap model the step runs through.
  """
  if not hp.measure:
    return None
  return measurements_lib.Measurements(model, hp.measure, delta=hp.delta,
                                       downsampling=hp.saturation_downsampling,
                                       rule=hp.saturation_rule, log_every=hp.log_every)


def check_distribution(hp: Hparams) -> int:
  """Checks the `--distribution` flags (see `distribute.check_options`); returns the
  number of replicas.

  Raises:
    ValueError: one line naming the flag.
  """
  gpus = distribute.visible_gpus() if hp.distribution == "mirrored" else 0
  return distribute.check_options(
      distribution=hp.distribution, cpu_replicas=hp.cpu_replicas, num_gpus=gpus,
      batch_size=hp.batch_size, sync_batch_norm=hp.sync_batch_norm, sam_sync=hp.sam_sync,
      measure=hp.measure, mixed_precision=hp.mixed_precision)


def check_hparams(hp: Hparams, num_train: int):
  """Checks what the flags alone cannot; errors name the flag.

  Raises:
    ValueError: bad combinations (e.g. a schedule longer than training).
  """
  check_distribution(hp)
  measurements_lib.check_names(hp.measure)
  if hp.log_every < 1:
    raise ValueError(f"--log_every must be a positive integer, got --log_every={hp.log_every}")
  saturation_lib.check_delta(hp.delta)
  if hp.lora_rank is not None and hp.experiment != "sparsify_finetune":
    raise ValueError(f"--lora_rank={hp.lora_rank} is for --experiment=sparsify_finetune, "
                     f"not --experiment={hp.experiment}")
  if hp.adv_train and hp.attack == "none":
    raise ValueError("--adv_train needs an --attack (fgsm or pgd), got --attack=none")
  masking_checks.check_options(hp)
  eps_sweep.check_options(hp)
  if hp.batch_size > num_train:
    raise ValueError(f"--batch_size={hp.batch_size} is larger than the {num_train} "
                     "training images")
  total = hp.total_iterations(num_train)
  if hp.rewind_iteration >= total:
    raise ValueError(f"--rewind_iteration={hp.rewind_iteration} must be smaller than the "
                     f"{total} training iterations")
  optimizer_groups(hp, num_train)  # Raises on bad optimizer / schedule settings.
  perturbation = split_optimizer(hp.optimizer)[0]
  if hp.implicit:
    if perturbation not in ("sam", "asam"):
      raise ValueError(f"--implicit needs --optimizer=sam-<base> or asam-<base>, got "
                       f"--optimizer={hp.optimizer}")
    if hp.pattern not in ("structured", "nm"):
      raise ValueError(f"--implicit needs a mask: --pattern=structured or nm, got "
                       f"--pattern={hp.pattern}")
    if hp.pattern == "nm":
      ssam.check_nm(hp.n_structured, hp.m_structured)
  if perturbation in ("ssamf", "ssamd"):
    ssam.check_sparsity(hp.sparsity)
    if perturbation == "ssamf" and hp.pattern == "nm":
      ssam.check_nm(hp.n_structured, hp.m_structured)
  if perturbation is not None:
    check_sharpness_options(rho=hp.rho, bn_stats=hp.sam_bn_stats,
                            batch_splits=hp.sam_batch_splits, batch_size=hp.batch_size,
                            asam_rule=hp.asam_rule, ssam_norm=hp.ssam_norm)


class Runner:
  """Runs every trial and level of one experiment (see the module docstring).

  Args:
    hparams: the experiment.
    dataset: a loaded `data.Dataset`.
    base_dir: the folder under which the run folder is derived.
    force: delete the run folder first.
    progress: show a progress bar.
    callbacks: Keras callbacks; they see one "epoch" per evaluation period
      (logs: the training means and `val_*` / `test_*` metrics), and one batch
      per compiled chunk of steps. `model.stop_training = True` ends the level.
  """

  def __init__(self, hparams: Hparams, dataset, base_dir: str, *, force: bool = False,
               progress: bool = True, callbacks: Optional[Sequence] = None):
    self.hparams = hparams
    if hparams.train_examples is not None:
      dataset = _first_train_examples(dataset, hparams.train_examples)
    self.dataset = dataset
    self.num_train = len(dataset.x_train)
    self.experiment = EXPERIMENTS.get(hparams.experiment)(hparams)
    self.experiment.check(dataset, self.num_train)
    check_hparams(hparams, self.num_train)
    if hparams.probes:
      check_probe_settings(hparams, dataset)
    self.run_dir = hparams.run_dir(base_dir)
    # None for --distribution=default: no strategy, nothing changes.
    self.distribution = distribute.make_distribution(hparams.distribution, hparams.cpu_replicas)
    self.progress = progress
    self.callbacks = list(callbacks or [])
    self.attack = make_attack(build.attack_config(hparams))
    self.top5 = dataset.num_classes > 10 or hparams.top5
    self.eval_attacks = build.eval_attack_specs(hparams)
    self.columns = columns(self.top5) + tuple(f"adv_acc_{name}" for name, _ in self.eval_attacks)
    if hparams.eval_examples is not None:
      self.columns += ("examples",)
    self.train_columns = columns(self.top5, sharpness=hparams.sharpness_examples > 0)
    if has_perturbation_masks(hparams):
      self.train_columns += ("mask_lived_weight",)
    self.train_columns += tuple(self.experiment.columns)
    self._sharpness_set = None
    if force and os.path.isdir(self.run_dir):
      shutil.rmtree(self.run_dir)
    # One model and engine serve every level of a phase (every level of the
    # lottery experiments), so each compiles only once.
    self._engines = {}
    self._tensorboard = None  # The level's TensorBoard writer, set by run_level.
    self._perturbation_masks = None
    self._teacher = None
    self.summary = None

  def run(self, trials: Optional[Sequence[int]] = None, finish: bool = True):
    """Runs (or finishes) every trial; returns the run folder.

    Args:
      trials: only these trials (a launcher's task); default all.
      finish: after the levels, run the experiment's closing work (`after_run`,
        `--probes`); a launcher's tasks leave it to one final call.

    Raises:
      DivergedError: a level's loss became NaN or infinite.
    """
    os.makedirs(self.run_dir, exist_ok=True)
    files.write_json(os.path.join(self.run_dir, "hparams.json"), self.hparams.to_dict())
    trials = range(self.hparams.trials) if trials is None else trials
    while not self._run_unclaimed_levels(trials):
      time.sleep(CLAIM_POLL_SECONDS)  # Other processes hold levels still to finish.
    if not finish:
      return self.run_dir
    self.summary = self.experiment.after_run(self)
    if self.hparams.probes and self.experiment.levels() > 0:
      self.summary = self._probes()
    return self.run_dir

  def _run_unclaimed_levels(self, trials) -> bool:
    """Trains every level of `trials` no other process holds, each trial's in order
    (see `claims`).

    Returns:
      True when every level is finished; False when others still hold some.
    """
    done = True
    for trial in trials:
      for level in range(self.experiment.levels()):
        directory = level_dir(self.run_dir, trial, level)
        if is_finished(directory):
          continue
        claim = claims.try_claim(directory)
        if claim is None:  # Another process trains it; its later levels wait.
          logging.info("%s is claimed by %s; moving on", directory,
                       claims.read_claim(directory))
          done = False
          break
        with claim:
          self.run_level(trial, level)
    return done

  def _probes(self):
    """`--probes`: probes of trial 0's final network (its last level)."""
    last = self.experiment.levels() - 1
    model = self.build(0, last)
    assign_weights(model, files.load_arrays(os.path.join(level_dir(self.run_dir, 0, last),
                                                         "weights_final.npz")),
                   "the final weights")
    return fit_probes(self.hparams, model, self.dataset, self.run_dir)

  # ---- one level -----------------------------------------------------------
  def _scope(self):
    return (contextlib.nullcontext() if self.distribution is None
            else self.distribution.scope())

  def build(self, trial, level):
    """The freshly initialised model of a level (the experiment's transform applied)."""
    hp = self.hparams
    set_precision(hp.mixed_precision)
    keras.utils.set_random_seed(derived_seed(hp.seed, trial, level, "init"))
    options = {**hp.model_options(), **self.experiment.model_options(level, self.num_train)}
    model = build_model(hp.model, self.dataset.input_shape, self.dataset.num_classes,
                        activation=self.experiment.activation(level, self.num_train),
                        l1_reg=hp.l1_reg, normalize=hp.normalize, dropout=hp.dropout,
                        **options)
    model = self.experiment.transform_model(model, trial, level)
    if hp.sync_batch_norm:
      distribute.synchronize_batch_norm(model)
    return model

  def teacher(self):
    """The `--teacher_dir` model (loaded once), or None."""
    if self.hparams.teacher_dir and self._teacher is None:
      self._teacher = load_teacher(self.hparams.teacher_dir, self.dataset.input_shape,
                                   self.dataset.num_classes)
    return self._teacher

  def _make_engine(self, model, level):
    hp = self.hparams
    loss_scale = LossScale() if hp.mixed_precision else None
    augment = augment_lib.build(hp.augment, num_classes=self.dataset.num_classes,
                                fill=normalization_mean(hp.normalize))
    self._perturbation_masks = perturbation_masks(hp, model, self.dataset.num_classes,
                                                  augment, self.num_train)

    self.train_columns += tuple(c for c in sparsity_modules.module_logs(model)
                                if c not in self.train_columns)
    measurement = make_measurement(hp, model)
    if measurement is not None:
      self.train_columns += tuple(c for c in measurement.columns()
                                  if c not in self.train_columns)

    def standard(distill=True):
      return standard_loss_grad_fn(
          model, num_classes=self.dataset.num_classes, label_smoothing=hp.label_smoothing,
          attack=self.attack if hp.adv_train else None, adv_mix=hp.adv_mix,
          teacher=self.teacher() if distill else None,
          distill_temperature=hp.distill_temperature, loss_scale=loss_scale,
          sharpness=sharpness_wrapper(hp, model, self._perturbation_masks),
          taps=measurement.tap_model if measurement is not None else None)

    defaults = Defaults(groups=lambda: optimizer_groups(hp, self.num_train),
                        loss_grad_fn=standard)
    loss_grad_fn = self.experiment.loss_grad_fn(level, model, defaults)
    groups = self.experiment.optimizer_groups(level, model, self.num_train, defaults)
    return Engine(model, loss_grad_fn, groups,
                  x_train=self.dataset.x_train, y_train=self.dataset.y_train,
                  batch_size=hp.batch_size, attack=self.attack, adv_train=hp.adv_train,
                  adv_mix=hp.adv_mix, augment=augment, prepare=self.dataset.prepare,
                  decode=self.dataset.decode, decode_eval=self.dataset.decode_eval,
                  grad_clip_norm=hp.grad_clip_norm, loss_scale=loss_scale, top5=self.top5,
                  extra_state=(self._perturbation_masks.variables
                               if self._perturbation_masks else None),
                  measurement=measurement, eval_attacks=self.eval_attacks,
                  distribution=self.distribution, compile=hp.compile)

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

  def _eval_points(self, start, total, every):
    points = {start, total}
    points.update(range(every * (start // every + 1), total, every))
    return sorted(p for p in points if p >= start)

  def _save_points(self, start, total):
    """Iterations at which `--save_every_epochs` saves the weights (after `start`)."""
    hp = self.hparams
    if not hp.save_every_epochs:
      return []
    every = max(1, int(round(hp.save_every_epochs * hp.steps_per_epoch(self.num_train))))
    return [p for p in range(every, total, every) if p > start]

  def run_level(self, trial, level):
    """Trains one pruning level unless its folder says it is finished.

    Raises:
      DivergedError: the level diverged, now or in an earlier run.
    """
    hp = self.hparams
    directory = level_dir(self.run_dir, trial, level)
    metadata = read_metadata(directory)
    if metadata.get("completed"):
      return
    if metadata.get("diverged"):
      raise DivergedError(self._diverged_message(trial, level,
                                                 metadata.get("diverged_iteration")))
    began = time.time()
    logging.info("training %s", directory)
    phase = self.experiment.phase(level)
    with self._scope():  # Mirrored variables (model, masks, optimizers) when distributed.
      fresh = self.build(trial, level)
      if phase not in self._engines:
        self._engines[phase] = (fresh, self._make_engine(fresh, level))
    model, engine = self._engines[phase]
    fresh_weights = model_weights(fresh)
    weights, start = self.experiment.start(level, LevelHistory(self.run_dir, trial),
                                           fresh_weights)
    # A level starts from every variable of its source, non-trainable ones too
    # (batch-norm statistics of the rewind point); fresh ones for a fresh start.
    assign_weights(model, fresh_weights if weights is None else weights,
                   f"{directory}: starting weights")
    layers = masked_layers(model)
    masks = self.experiment.level_masks(trial, level, layers)
    if masks is None and self.experiment.prunes:
      masks = self._masks(trial, level, layers)
    elif masks is None:  # The masks the starting weights hold (a pruned baseline stays pruned).
      masks = {layer.name: np.asarray(layer.mask.numpy()) for layer in layers}
    for layer in layers:
      layer.mask.assign(masks[layer.name])
      # Zero the pruned weights so that nothing (an L1 penalty, say) sees them.
      layer.raw_kernel.assign(layer.raw_kernel * masks[layer.name])

    engine.reset(derived_seed(hp.seed, trial, level, "attack"), start)
    checkpoint = os.path.join(directory, "checkpoint.npz")
    logs = {split: [] for split in SPLITS}
    self._tensorboard = tensorboard.LevelWriter(self.run_dir, trial, level,
                                                fresh=not os.path.exists(checkpoint))
    self._warm_up(engine)
    if os.path.exists(checkpoint):
      state = files.load_arrays(checkpoint)
      logs = json.loads(state.pop("logs").tobytes().decode())
      engine.set_state(state)
      logging.info("resuming %s at iteration %d", directory, int(engine.iteration.numpy()))
    else:
      if self._perturbation_masks is not None:
        self._perturbation_masks.initialize(derived_seed(hp.seed, trial, level, "perturb"))
        if self._perturbation_masks.refresh_points(1, hp.steps_per_epoch(self.num_train)) == [0]:
          self._refresh_perturbation_masks(engine, 0, derived_seed(hp.seed, trial, "data"),
                                           derived_seed(hp.seed, trial, level, "perturb"))
      _save_layer_arrays(directory, "masks", masks)
      _save_layer_arrays(directory, "init_kernels", _kernels(layers))
      files.save_arrays(os.path.join(directory, "weights_init.npz"), model_weights(model))
      self._evaluate(engine, logs, start, final=False)
      if engine.measurement is not None:  # Periods measure their own batches only.
        engine.measurement.reset()
      self._checkpoint(directory, engine, logs)

    total = self.experiment.total_iterations(level, self.num_train)
    iteration = int(engine.iteration.numpy())
    record_rewind = (level == 0 and hp.experiment == "rewind")
    eval_points = self._eval_points(start, total, hp.eval_interval(self.num_train))
    stops = eval_points
    if record_rewind:
      stops = sorted(set(stops) | {hp.rewind_iteration})
      if hp.rewind_iteration == 0 and iteration == 0:
        files.save_arrays(os.path.join(directory, "weights_rewind.npz"), model_weights(model))
    data_seed = derived_seed(hp.seed, trial, "data")
    refresh_points = []
    if self._perturbation_masks is not None:
      refresh_points = self._perturbation_masks.refresh_points(
          total, hp.steps_per_epoch(self.num_train))
      stops = sorted(set(stops) | set(refresh_points))
    save_points = self._save_points(start, total)
    stops = sorted(set(stops) | set(save_points))
    stream = engine.batches(data_seed, iteration, drop_last=hp.drop_last)
    percent = pruning.percent_remaining(masks)
    bar = tqdm(total=total - start, initial=iteration - start,
               desc=f"trial {trial} prune_iter {level} ({percent:.1f}%)",
               disable=not self.progress, leave=False, dynamic_ncols=True)
    callbacks = keras.callbacks.CallbackList(self.callbacks, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    chunk_start = iteration
    train_sums = np.zeros(len(METRICS))
    period = len(logs["train"])
    callbacks.on_epoch_begin(period)
    for stop in stops:
      if stop <= iteration:
        continue
      callbacks.on_train_batch_begin(iteration)
      try:
        means = engine.train(stream, stop - iteration)
      except Diverged as e:
        bar.close()
        self._diverged(directory, trial, level, logs, e.iteration)
      train_sums += np.array([means[m] for m in METRICS]) * (stop - iteration)
      callbacks.on_train_batch_end(stop - 1, means)
      bar.update(stop - iteration)
      iteration = stop
      if record_rewind and stop == hp.rewind_iteration:
        files.save_arrays(os.path.join(directory, "weights_rewind.npz"), model_weights(model))
      if stop in save_points:
        files.save_arrays(checkpoint_path(directory, stop), model_weights(model))
      if stop in refresh_points:
        self._refresh_perturbation_masks(engine, stop, data_seed,
                                         derived_seed(hp.seed, trial, level, "perturb"))
      if stop in eval_points:
        row = self._row(engine, stop, {m: float(s) / (stop - chunk_start)
                                       for m, s in zip(METRICS, train_sums)},
                        self.train_columns)
        row.update(self._sharpness(engine))
        if self._perturbation_masks is not None:
          row["mask_lived_weight"] = self._perturbation_masks.lived_weight()
        row.update(sparsity_modules.module_logs(model))
        row.update(self.experiment.measure(level, model))
        logs["train"].append(row)
        chunk_start, train_sums = stop, np.zeros(len(METRICS))
        results = self._evaluate(engine, logs, stop, final=stop == eval_points[-1])
        if engine.measurement is not None:
          row.update(engine.measurement.results())
          engine.measurement.reset()
        self._tensorboard.write_row("train", row)
        if hp.phd_lab_csv:
          self._write_phd_lab_csv(directory, logs)
        self.experiment.on_evaluate(level, model, logs, directory)
        bar.set_postfix(acc=f"{results['test']['acc']:.4f}",
                        adv_acc=f"{results['test']['adv_acc']:.4f}")
        self._checkpoint(directory, engine, logs)
        epoch_logs = {m: row[m] for m in METRICS if m in row}
        for split, prefix in (("valid", "val_"), ("test", "test_")):
          epoch_logs.update({prefix + m: results[split][m] for m in METRICS
                             if m in results[split]})
        callbacks.on_epoch_end(period, epoch_logs)
        period += 1
        if model.stop_training:
          break
        if stop != stops[-1]:
          callbacks.on_epoch_begin(period)
    callbacks.on_train_end()
    bar.close()
    self._finish(directory, trial, level, layers, model, masks, logs, began, iteration,
                 engine)

  # ---- logs --------------------------------------------------------------------
  def _row(self, engine, iteration, metrics, names=None):
    row = {"iteration": iteration, **metrics,
           "epoch": round(iteration / self.hparams.steps_per_epoch(self.num_train), 6)}
    rates = engine.learning_rates(max(iteration - 1, 0))
    row["lr"] = rates.get("weights", next(iter(rates.values())))
    return {c: row[c] for c in (names or self.columns) if c in row}

  def _write_phd_lab_csv(self, directory, logs):
    """`--phd_lab_csv`: this evaluation period as the seed's per-epoch CSV row."""
    hp = self.hparams
    train, test = logs["train"][-1], logs["test"][-1]
    row = {"training_accuracy": train["acc"], "training_top5-accuracy": train.get("top5"),
           "training_loss": train["loss"], "test_accuracy": test["acc"],
           "test_top5-accuracy": test.get("top5"), "test_loss": test["nat_loss"]}
    row.update({k: v for k, v in train.items() if "saturation_" in k
                or "intrinsic-dimensionality_" in k})
    name = saturation_lib.phd_lab_csv_name(
        hp.model, hp.dataset, hp.resolution or self.dataset.input_shape[0], hp.batch_size,
        int(round(hp.total_iterations(self.num_train) / hp.steps_per_epoch(self.num_train))))
    saturation_lib.write_phd_lab_csv(os.path.join(directory, name), len(logs["train"]) - 1,
                                     row)

  def _refresh_perturbation_masks(self, engine, iteration, data_seed, seed):
    """SSAM's mask refresh after the first batch of an epoch (`sparse_perturbation`)."""
    hp = self.hparams
    steps_per_epoch = hp.steps_per_epoch(self.num_train)
    epoch = self._perturbation_masks.epoch_at(iteration, steps_per_epoch)

    def batch_fn(kind, count, epoch):
      if kind == "sample":  # Without replacement, a pure function of (seed, epoch).
        order = tf.random.experimental.stateless_shuffle(
            tf.range(self.num_train), seed=tf.constant([data_seed, epoch], tf.int64))
        return engine.examples(order[:min(count, self.num_train)].numpy())
      first = epoch * steps_per_epoch  # The batch the step trained on, as it saw it.
      indices = next(iter(index_stream(self.num_train, hp.batch_size, data_seed, first,
                                       whole_epochs=True)))  # `Engine.batches`' order.
      return engine.examples(indices.numpy(), augment_iteration=first)

    self._perturbation_masks.refresh(epoch, seed, batch_fn)
    logging.info("perturbation masks refreshed at iteration %d: %.4f of the weights live",
                 iteration, self._perturbation_masks.lived_weight())

  def _sharpness(self, engine):
    """Sharpness and m-sharpness on the fixed set (`--sharpness_examples`), or {}."""
    hp = self.hparams
    if hp.sharpness_examples == 0:
      return {}
    if self._sharpness_set is None:
      count = min(hp.sharpness_examples, self.num_train)
      self._sharpness_set = engine.stored_examples(range(count), for_evaluation=True)
    return engine.sharpness(*self._sharpness_set, rho=hp.sharpness_rho,
                            batch_size=hp.batch_size)

  def _warm_up(self, engine):
    """Compiles the engine's training and evaluation at once (`Engine.warm_up`), with the
    first set `_evaluate` evaluates."""
    split, stream = next((split, stream) for split, stream in EVAL_STREAMS
                         if len(getattr(self.dataset, f"y_{split}")))
    count = self.hparams.eval_examples
    engine.warm_up(getattr(self.dataset, f"x_{split}")[:count],
                   getattr(self.dataset, f"y_{split}")[:count], stream)

  def _evaluate(self, engine, logs, iteration, final=True):
    """Evaluates validation and test sets: all of them, or the first `--eval_examples`
    images of each unless `final` (then column `examples` says how many)."""
    results = {}
    count = None if final else self.hparams.eval_examples
    for split, stream in EVAL_STREAMS:
      x = getattr(self.dataset, f"x_{split}")[:count]
      y = getattr(self.dataset, f"y_{split}")[:count]
      results[split] = self._row(engine, iteration, engine.evaluate(x, y, stream))
      if self.hparams.eval_examples is not None:
        results[split]["examples"] = len(y)
      logs[split].append(results[split])
      if self._tensorboard is not None:
        self._tensorboard.write_row(split, results[split])
    return results

  def _checkpoint(self, directory, engine, logs):
    state = engine.get_state()
    state["logs"] = np.frombuffer(json.dumps(logs).encode(), np.uint8)
    files.save_arrays(os.path.join(directory, "checkpoint.npz"), state)
    self._write_csvs(directory, logs)
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def _write_csvs(self, directory, logs):
    for split in SPLITS:
      names = self.train_columns if split == "train" else self.columns
      files.write_csv(os.path.join(directory, f"{split}.csv"), names, logs[split])

  def _diverged_message(self, trial, level, iteration):
    return (f"training diverged (non-finite loss) in {self.run_dir}, trial {trial}, "
            f"prune_iter {level}, at iteration {iteration}; lower the learning rate, or "
            "re-run with --force to start over")

  def _diverged(self, directory, trial, level, logs, iteration):
    """Keeps the logs up to the last finite evaluation, marks the level, raises."""
    self._write_csvs(directory, logs)
    self._tensorboard.close()
    files.write_json(os.path.join(directory, "metadata.json"), {
        "trial": trial, "prune_iteration": level, "completed": False, "diverged": True,
        "diverged_iteration": iteration})
    checkpoint = os.path.join(directory, "checkpoint.npz")
    if os.path.exists(checkpoint):
      os.remove(checkpoint)
    raise DivergedError(self._diverged_message(trial, level, iteration))

  def _finish(self, directory, trial, level, layers, model, masks, logs, began, iteration,
              engine):
    self._write_csvs(directory, logs)
    self._tensorboard.close()
    _save_layer_arrays(directory, "post_kernels", _kernels(layers))
    files.save_arrays(os.path.join(directory, "weights_final.npz"), model_weights(model))
    self._masking_checks(model, trial, level, directory)
    if eps_sweep.enabled(self.hparams):
      eps_sweep.sweep_level(
          model, self.dataset, self.hparams, trial, directory,
          desc=f"trial {trial} prune_iter {level} eps sweep" if self.progress else None)
    remaining = int(sum(m.sum() for m in masks.values()))
    total = int(sum(m.size for m in masks.values()))
    files.write_json(os.path.join(directory, "metadata.json"), {
        "trial": trial,
        "prune_iteration": level,
        "percent_weights_remaining": 100.0 * remaining / total,
        "weights_remaining": remaining,
        "weights_total": total,
        "layer_weights_remaining": {name: int(m.sum()) for name, m in masks.items()},
        "final_iteration": iteration,
        "completed": True,
        "seconds": time.time() - began,
        "compile": engine.compile_mode,
        # What each log must hold: the analysis refuses a level whose files disagree.
        "files": {f"{split}.csv": files.csv_record(os.path.join(directory, f"{split}.csv"))
                  for split in SPLITS},
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        **self.experiment.metadata(level, model, directory, logs),
    })
    os.remove(os.path.join(directory, "checkpoint.npz"))

  def _masking_checks(self, model, trial, level, directory):
    """`--masking_checks`: the gradient-masking checks' attacks on the level's final
    network, kept in its folder before `metadata.json` (so a killed run redoes them)."""
    if masking_checks.enabled(self.hparams):
      masking_checks.check_level(
          self.hparams, model, self.dataset, trial, directory,
          desc=f"trial {trial} prune_iter {level} masking checks" if self.progress else None)


def _first_train_examples(dataset, count):
  """`dataset` with only its first `count` training images.

  Raises:
    ValueError: more than the data set has.
  """
  if count > len(dataset.x_train):
    raise ValueError(f"--train_examples={count} is more than the {len(dataset.x_train)} "
                     "training images")
  return dataclasses.replace(dataset, x_train=dataset.x_train[:count],
                             y_train=dataset.y_train[:count])
