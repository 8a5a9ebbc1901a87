"""The loop that runs an experiment's trials and pruning levels on the engine.

The run folder (`hparams.run_dir(base_dir)`) holds `hparams.json` and a
folder per trial and level (`trial_<t>/prune_iter_<k>/`, listed in
`level_log`). The objects come from `build`, the log of a level is written by
`level_log`, and what differs between experiments is asked of the experiment's
hooks (`registry.Experiment`): this module is the loop alone.

Each stage checks for its own output first: finished levels are skipped, and an
interrupted level resumes from `checkpoint.npz` (every variable of the model,
the optimizers and the engine, written atomically after every evaluation), so
re-running a killed command finishes it with the same numbers. A level whose
loss becomes NaN or infinite stops at once, keeps its CSVs and says `diverged`
in `metadata.json`; re-running it is refused until `--force`.
"""

import contextlib
import os
import shutil
import time
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tqdm import tqdm

from robust_sparse.core import claims, files
from robust_sparse.core.hparams import Hparams
from robust_sparse.core.run_folder import (COMPILE_FILE, LevelHistory, checkpoint_path,
                                           derived_seed, is_finished, level_dir,
                                           read_metadata)
from robust_sparse.core.streams import Stream
from robust_sparse.experiments import build, eps_sweep, level_log, masking_checks
from robust_sparse.experiments.build import check_distribution  # noqa: F401  Re-exported.
from robust_sparse.experiments.level_log import LevelLog
from robust_sparse.experiments.phd_lab import check_probe_settings, fit_probes
from robust_sparse.experiments.registry import EXPERIMENTS
from robust_sparse.nn import pruning, sparsity_modules
from robust_sparse.nn.layers import masked_layers
from robust_sparse.nn.weights import assign_weights, model_weights
from robust_sparse.training import distribute
from robust_sparse.training.engine import Diverged, index_stream
from robust_sparse.training.steps import METRICS

# The evaluated splits, in order, with the attack's random stream of each.
EVAL_STREAMS = (("valid", Stream.VALID_ATTACK), ("test", Stream.TEST_ATTACK))
# How often a process that has nothing left to claim looks again (levels held by others).
CLAIM_POLL_SECONDS = 2.0


class DivergedError(RuntimeError):
  """A level's loss became NaN or infinite (now or in an earlier run of the command)."""


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
    self.dataset = dataset = build.train_subset(dataset, hparams)
    self.num_train = len(dataset.x_train)
    self.experiment = EXPERIMENTS.get(hparams.experiment)(hparams)
    self.experiment.check(dataset, self.num_train)
    build.check_hparams(hparams, self.num_train)
    masking_checks.check_options(hparams)
    eps_sweep.check_options(hparams)
    if hparams.probes:
      check_probe_settings(hparams, dataset)
    self.run_dir = hparams.run_dir(base_dir)
    # None for --distribution=default: no strategy, nothing changes.
    self.distribution = distribute.make_distribution(hparams.distribution, hparams.cpu_replicas)
    self.progress = progress
    self.callbacks = list(callbacks or [])
    self.attack = build.attack(hparams)
    self.top5 = dataset.num_classes > 10 or hparams.top5
    self.eval_attacks = build.eval_attack_specs(hparams)
    self.columns = (level_log.columns(self.top5)
                    + tuple(f"adv_acc_{name}" for name, _ in self.eval_attacks)
                    + (("examples",) if hparams.eval_examples is not None else ()))
    self.train_columns = (level_log.columns(self.top5, sharpness=hparams.sharpness_examples > 0)
                          + (("mask_lived_weight",) if build.has_perturbation_masks(hparams)
                             else ()) + tuple(self.experiment.columns))
    self._sharpness_set = None
    if force and os.path.isdir(self.run_dir):
      shutil.rmtree(self.run_dir)
    # One model and engine serve every level of a phase (every level of the
    # lottery experiments), so each compiles only once.
    self._engines = {}
    self._compile_record = None  # COMPILE_FILE's contents, where "auto" timed its modes.
    self._log = None  # The level's log, set by run_level.
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
      last = self.experiment.levels() - 1  # Probes of trial 0's final network.
      model = self.build(0, last)
      assign_weights(model, LevelHistory(self.run_dir, 0).final_weights(last),
                     "the final weights")
      self.summary = fit_probes(self.hparams, model, self.dataset, self.run_dir)
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

  # ---- what a level trains -------------------------------------------------------
  def build(self, trial, level):
    """The freshly initialised model of a level (the experiment's transform applied)."""
    return build.level_model(self.hparams, self.experiment, self.dataset, trial, level,
                             self.num_train)

  def teacher(self):
    """The `--teacher_dir` model (loaded once), or None."""
    if self.hparams.teacher_dir and self._teacher is None:
      self._teacher = build.teacher(self.hparams.teacher_dir, self.dataset.input_shape,
                                    self.dataset.num_classes)
    return self._teacher

  def _make_engine(self, model, level):
    made = build.engine(self.hparams, model, self.dataset, self.experiment, level,
                        num_train=self.num_train, attack=self.attack,
                        eval_attacks=self.eval_attacks, top5=self.top5,
                        teacher_fn=self.teacher, distribution=self.distribution)
    self._perturbation_masks = made.perturbation_masks
    measurement = made.engine.measurement
    for names in (sparsity_modules.module_logs(model),
                  measurement.columns() if measurement is not None else ()):
      self.train_columns += tuple(c for c in names if c not in self.train_columns)
    return made.engine

  def _masks(self, trial, level, layers):
    """The masks of a level: none pruned at level 0, else pruned from the last level."""
    if level == 0:
      return {layer.name: np.ones(layer.mask.shape, np.float32) for layer in layers}
    previous = level_dir(self.run_dir, trial, level - 1)
    names = [layer.name for layer in layers]
    hp = self.hparams
    if hp.prune_scope == "global":
      rates = {name: hp.prune_rate for name in names}
    else:
      rates = pruning.layer_rates(names, hp.prune_rate, hp.prune_rate_output)
    return pruning.prune(level_log.load_layer_arrays(previous, "post_kernels", names),
                         level_log.load_layer_arrays(previous, "masks", names), rates,
                         hp.prune_scope)

  def _stops(self, start, total, snapshots):
    """(every iteration the loop stops at, evaluation points, save points, refresh points)."""
    hp = self.hparams
    every = hp.eval_interval(self.num_train)
    evals = {start, total} | set(range(every * (start // every + 1), total, every))
    evals = sorted(p for p in evals if p >= start)
    saves = []
    if hp.save_every_epochs:  # `--save_every_epochs`' weights, after `start`.
      each = max(1, int(round(hp.save_every_epochs * hp.steps_per_epoch(self.num_train))))
      saves = [p for p in range(each, total, each) if p > start]
    refreshes = []
    if self._perturbation_masks is not None:
      refreshes = self._perturbation_masks.refresh_points(total,
                                                          hp.steps_per_epoch(self.num_train))
    return (sorted(set(evals) | set(snapshots) | set(refreshes) | set(saves)),
            evals, saves, refreshes)

  # ---- one level -----------------------------------------------------------------
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
    with (contextlib.nullcontext() if self.distribution is None  # Mirrored variables.
          else self.distribution.scope()):
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
    perturb_seed = derived_seed(hp.seed, trial, level, "perturb")
    data_seed = derived_seed(hp.seed, trial, "data")
    steps_per_epoch = hp.steps_per_epoch(self.num_train)
    self._log = log = LevelLog(self.run_dir, directory, trial, level, self.columns,
                               self.train_columns)
    self._settle_compile(engine)
    self._warm_up(engine)
    if log.resume(engine):
      logging.info("resuming %s at iteration %d", directory, int(engine.iteration.numpy()))
    else:
      if self._perturbation_masks is not None:
        self._perturbation_masks.initialize(perturb_seed)
        if self._perturbation_masks.refresh_points(1, steps_per_epoch) == [0]:
          self._refresh_perturbation_masks(engine, 0, data_seed, perturb_seed)
      level_log.save_layer_arrays(directory, "masks", masks)
      level_log.save_layer_arrays(directory, "init_kernels", level_log.kernels(layers))
      files.save_arrays(os.path.join(directory, "weights_init.npz"), model_weights(model))
      self._evaluate(engine, start, final=False)
      if engine.measurement is not None:  # Periods measure their own batches only.
        engine.measurement.reset()
      log.save(engine)

    total = self.experiment.total_iterations(level, self.num_train)
    iteration = int(engine.iteration.numpy())
    snapshots = self.experiment.snapshots(level)  # {iteration: file}, e.g. rewind's weights.
    if iteration == 0 and 0 in snapshots:
      files.save_arrays(os.path.join(directory, snapshots[0]), model_weights(model))
    stops, eval_points, save_points, refresh_points = self._stops(start, total, snapshots)
    stream = engine.batches(data_seed, iteration, drop_last=hp.drop_last)
    bar = tqdm(total=total - start, initial=iteration - start,
               desc=f"trial {trial} prune_iter {level} "
                    f"({pruning.percent_remaining(masks):.1f}%)",
               disable=not self.progress, leave=False, dynamic_ncols=True)
    callbacks = keras.callbacks.CallbackList(self.callbacks, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    chunk_start = iteration
    train_sums = np.zeros(len(METRICS))
    period = len(log.rows["train"])
    callbacks.on_epoch_begin(period)
    for stop in stops:
      if stop <= iteration:
        continue
      callbacks.on_train_batch_begin(iteration)
      try:
        means = engine.train(stream, stop - iteration)
      except Diverged as e:
        bar.close()
        log.diverged(trial, level, e.iteration)
        raise DivergedError(self._diverged_message(trial, level, e.iteration))
      train_sums += np.array([means[m] for m in METRICS]) * (stop - iteration)
      callbacks.on_train_batch_end(stop - 1, means)
      bar.update(stop - iteration)
      iteration = stop
      if stop in snapshots:
        files.save_arrays(os.path.join(directory, snapshots[stop]), model_weights(model))
      if stop in save_points:
        files.save_arrays(checkpoint_path(directory, stop), model_weights(model))
      if stop in refresh_points:
        self._refresh_perturbation_masks(engine, stop, data_seed, perturb_seed)
      if stop in eval_points:
        row = self._row(engine, stop, {m: float(s) / (stop - chunk_start)
                                       for m, s in zip(METRICS, train_sums)},
                        self.train_columns)
        row.update(self._sharpness(engine))
        if self._perturbation_masks is not None:
          row["mask_lived_weight"] = self._perturbation_masks.lived_weight()
        row.update(sparsity_modules.module_logs(model))
        row.update(self.experiment.measure(level, model))
        log.add("train", row)
        chunk_start, train_sums = stop, np.zeros(len(METRICS))
        results = self._evaluate(engine, stop, final=stop == eval_points[-1])
        if engine.measurement is not None:
          row.update(engine.measurement.results())
          engine.measurement.reset()
        log.write_train(row)
        if hp.phd_lab_csv:
          log.write_phd_lab_csv(hp, hp.resolution or self.dataset.input_shape[0],
                                self.num_train)
        self.experiment.on_evaluate(level, model, log.rows, directory)
        bar.set_postfix(acc=f"{results['test']['acc']:.4f}",
                        adv_acc=f"{results['test']['adv_acc']:.4f}")
        log.save(engine)
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
    self._finish(log, trial, level, layers, model, masks, began, iteration, engine)

  def _finish(self, log, trial, level, layers, model, masks, began, iteration, engine):
    """The level's final files; `--masking_checks` and `--eps_sweep` attack the final
    network before `metadata.json` (so a killed run redoes them)."""
    directory = log.directory
    log.close()
    level_log.save_layer_arrays(directory, "post_kernels", level_log.kernels(layers))
    files.save_arrays(os.path.join(directory, "weights_final.npz"), model_weights(model))
    desc = f"trial {trial} prune_iter {level}"
    if masking_checks.enabled(self.hparams):
      masking_checks.check_level(self.hparams, model, self.dataset, trial, directory,
                                 desc=f"{desc} masking checks" if self.progress else None)
    if eps_sweep.enabled(self.hparams):
      eps_sweep.sweep_level(model, self.dataset, self.hparams, trial, directory,
                            desc=f"{desc} eps sweep" if self.progress else None)
    log.finish(trial, level, masks, iteration, began, engine.compile_mode,
               {"eval_compile": "xla" if engine.eval_jit_compile else "graph",
                **({"compile_timed": self._compile_record["steps_per_second"]}
                   if self._compile_record else {}),
                "levels": self.experiment.levels(),
                **self.experiment.metadata(level, model, directory, log.rows)})

  def _diverged_message(self, trial, level, iteration):
    return (f"training diverged (non-finite loss) in {self.run_dir}, trial {trial}, "
            f"prune_iter {level}, at iteration {iteration}; lower the learning rate, or "
            "re-run with --force to start over")

  # ---- evaluation ----------------------------------------------------------------
  def _row(self, engine, iteration, metrics, names=None):
    return level_log.row(names or self.columns, iteration, metrics,
                         steps_per_epoch=self.hparams.steps_per_epoch(self.num_train),
                         learning_rates=engine.learning_rates(max(iteration - 1, 0)))

  def _settle_compile(self, engine):
    """`--compile=auto`'s timed choice (`Engine.settle_compile`), made once per run: the
    first process to time the modes records the faster in the run folder's
    COMPILE_FILE, and every level, resumed run and worker sharing the folder trains
    as it says (a level resumed as another mode would not resume exactly)."""
    if not engine.compile_candidates:
      return
    path = os.path.join(self.run_dir, COMPILE_FILE)
    if not os.path.exists(path):
      mode, timing = engine.fastest_compile_mode()
      files.write_json_once(path, {"compile": mode, "steps_per_second": timing})
    self._compile_record = files.read_json(path)  # Another worker's, where it was first.
    engine.settle_compile(self._compile_record["compile"])

  def _warm_up(self, engine):
    """Compiles the engine's training and evaluation at once (`Engine.warm_up`), with the
    first set `_evaluate` evaluates."""
    split, stream = next((split, stream) for split, stream in EVAL_STREAMS
                         if len(getattr(self.dataset, f"y_{split}")))
    count = self.hparams.eval_examples
    engine.warm_up(getattr(self.dataset, f"x_{split}")[:count],
                   getattr(self.dataset, f"y_{split}")[:count], stream)

  def _evaluate(self, engine, iteration, final=True):
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
      self._log.add(split, results[split])
    return results

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
