"""Objects built from an experiment's hyper-parameters, and the checks they need.

The hyper-parameters (`robust_sparse.core.hparams`) are plain values, read
without TensorFlow; this module is where they become the objects a run uses:
the model (`model`: the one place a model is built from hyper-parameters, for
the runner, a teacher, a pretrained run and the analysis), the attacks, the
optimizer groups, the sharpness wrapper, SSAM's perturbation masks, the
measurements and the engine that ties them together. `check_hparams` refuses,
up front and with one line naming the flag, what these objects cannot be.
"""

import dataclasses
from typing import Callable, List, NamedTuple, Optional, Tuple

import keras

from robust_sparse.attacks import make_attack, spec
from robust_sparse.attacks.registry import AttackConfig
from robust_sparse.core.hparams import AttackHparams, Hparams
from robust_sparse.core.run_folder import derived_seed, finished_run
from robust_sparse.data import augment as augment_lib
from robust_sparse.experiments.registry import Defaults
from robust_sparse.measure import measurements as measurements_lib
from robust_sparse.measure import saturation as saturation_lib
from robust_sparse.models import build_model, normalization_mean
from robust_sparse.nn.weights import assign_weights
from robust_sparse.training import distribute
from robust_sparse.training.engine import Engine
from robust_sparse.training.optimizers import make_optimizer, split_optimizer
from robust_sparse.training.schedules import make_schedule
from robust_sparse.training.sharpness import PERTURBATIONS, MaskContext, Perturbation
from robust_sparse.training.sharpness.sam import check_options as check_sharpness_options
from robust_sparse.training.sharpness.sam import sharpness_aware
from robust_sparse.training.steps import (LossScale, OptimizerGroup, cross_entropy,
                                          loss_and_gradients, standard_loss_grad_fn)


# ---- attacks ---------------------------------------------------------------------
def attack_config(hparams: AttackHparams) -> AttackConfig:
  """The budget of `--attack`, the attack of adversarial training and evaluation."""
  return AttackConfig(name=hparams.attack, eps=hparams.eps, step_size=hparams.pgd_step_size,
                      steps=hparams.pgd_steps, impl=hparams.attack_impl,
                      labels=hparams.attack_labels)


def eval_attack_specs(hparams: AttackHparams) -> List[Tuple[str, Callable]]:
  """[(column name, attack)] of `--eval_attacks` (one-line ValueError on a bad spec)."""
  if not hparams.eval_attacks.strip():
    return []
  return spec.parse_attack_specs(spec.split_attack_specs(hparams.eval_attacks),
                                 attack_config(hparams))


# ---- data and models -------------------------------------------------------------
def train_subset(dataset, hp: Hparams):
  """`dataset` with only its first `--train_examples` training images (all when unset).

  Raises:
    ValueError: more than the data set has.
  """
  count = hp.train_examples
  if count is None:
    return dataset
  if count > len(dataset.x_train):
    raise ValueError(f"--train_examples={count} is more than the {len(dataset.x_train)} "
                     "training images")
  return dataclasses.replace(dataset, x_train=dataset.x_train[:count],
                             y_train=dataset.y_train[:count])


def set_precision(mixed_precision: bool):
  keras.mixed_precision.set_global_policy("mixed_float16" if mixed_precision else "float32")


def model(hp: Hparams, input_shape, num_classes, experiment=None, trial: int = 0,
          level: int = 0, num_train: int = 0) -> keras.Model:
  """`--model` with the flags' activation, normalisation, dropout and options.

  Args:
    experiment: with it, the model of its level `level` of trial `trial`: the
      experiment's activation and options for the level (`num_train`
      training images), then its `transform_model`. Without: the flags' own
      model (a finished run's, to load its weights into).
  """
  activation, options = hp.activation, hp.model_options()
  if experiment is not None:
    activation = experiment.activation(level, num_train)
    options = {**options, **experiment.model_options(level, num_train)}
  built = build_model(hp.model, input_shape, num_classes, activation=activation,
                      l1_reg=hp.l1_reg, normalize=hp.normalize, dropout=hp.dropout, **options)
  return built if experiment is None else experiment.transform_model(built, trial, level)


def level_model(hp: Hparams, experiment, dataset, trial: int, level: int,
                num_train: int) -> keras.Model:
  """The freshly initialised model a level trains: `--mixed_precision`'s policy, the
  level's own initialisation seed, `model`, and `--sync_batch_norm`."""
  set_precision(hp.mixed_precision)
  keras.utils.set_random_seed(derived_seed(hp.seed, trial, level, "init"))
  built = model(hp, dataset.input_shape, dataset.num_classes, experiment, trial, level,
                num_train)
  if hp.sync_batch_norm:
    distribute.synchronize_batch_norm(built)
  return built


def teacher(run_dir: str, input_shape, num_classes) -> keras.Model:
  """The frozen final model of trial 0, level 0 of the finished run folder `run_dir`.

  Raises:
    ValueError: not a run folder, or its level 0 is unfinished or does not fit.
  """
  teacher_hp, weights = finished_run(run_dir, "--teacher_dir")
  built = model(teacher_hp, input_shape, num_classes)
  assign_weights(built, weights, f"--teacher_dir={run_dir}")
  built.trainable = False
  return built


# ---- training --------------------------------------------------------------------
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


def perturbation(hp: Hparams) -> Optional[Perturbation]:
  """The SAM-family method of `--optimizer=<perturbation>-<base>` (`sharpness.PERTURBATIONS`),
  or None for a plain optimizer."""
  name, _ = split_optimizer(hp.optimizer)
  return None if name is None else PERTURBATIONS.get(name)()


def sharpness_wrapper(hp: Hparams, network, masks=None):
  """`LossGradFn -> LossGradFn` for `--optimizer=<perturbation>-<base>`, else None.

  Args:
    masks: the method's `PerturbationMasks` (their current values restrict `e`).
  """
  method = perturbation(hp)
  if method is None:
    return None
  options = method.options(hp, masks)
  return lambda inner: sharpness_aware(inner, network, **options)


def has_perturbation_masks(hp: Hparams) -> bool:
  """Whether the method keeps masks refreshed during training (SSAM-F, SSAM-D, `--implicit`)."""
  method = perturbation(hp)
  return method is not None and method.has_masks(hp)


def perturbation_masks(hp: Hparams, network, num_classes, augment, num_train):
  """The method's perturbation masks when `has_perturbation_masks`, else None."""
  if not has_perturbation_masks(hp):
    return None
  loss = cross_entropy(num_classes, hp.label_smoothing)
  return perturbation(hp).masks(hp, MaskContext(
      network=network, loss=loss, loss_grad_fn=loss_and_gradients(network, loss),
      augment=augment, num_train=num_train))


def measurement(hp: Hparams, network):
  """The `--measure` measurements of `network` for the engine, or None.

  One `measurements.Measurements` for the whole list: saturation (a
  `saturation.SaturationTracker` of every conv and dense layer) and the
  activation measurements (`activation_stats.ActivationStatistics` of every
  activation layer, training steps every `--log_every`), behind one
  weight-sharing tap model the step runs through.
  """
  if not hp.measure:
    return None
  return measurements_lib.Measurements(network, hp.measure, delta=hp.delta,
                                       downsampling=hp.saturation_downsampling,
                                       rule=hp.saturation_rule, log_every=hp.log_every)


class LevelEngine(NamedTuple):
  """What `engine` builds for a phase's model.

  Attributes:
    engine: the `Engine` (its `measurement`: `--measure`'s, or None).
    perturbation_masks: SSAM's masks, refreshed by the loop, or None.
  """
  engine: Engine
  perturbation_masks: Optional[object]


def engine(hp: Hparams, network, dataset, experiment, level: int, *, num_train: int,
           attack: Callable, eval_attacks, top5: bool, teacher_fn: Callable,
           distribution=None) -> LevelEngine:
  """The engine that trains `network` for `level` of `experiment` (its optimizer groups
  and loss, from the flags' `Defaults`), with its perturbation masks.

  Args:
    teacher_fn: `() -> keras.Model or None`, the `--teacher_dir` model, called
      only when a loss distils.
    distribution: a `distribute.Distribution` (call in its scope), or None.
  """
  loss_scale = LossScale() if hp.mixed_precision else None
  augment = augment_lib.build(hp.augment, num_classes=dataset.num_classes,
                              fill=normalization_mean(hp.normalize))
  masks = perturbation_masks(hp, network, dataset.num_classes, augment, num_train)
  measured = measurement(hp, network)

  def standard(distill=True):
    return standard_loss_grad_fn(
        network, num_classes=dataset.num_classes, label_smoothing=hp.label_smoothing,
        attack=attack if hp.adv_train else None, adv_mix=hp.adv_mix,
        adv_loss=hp.adv_loss, trades_beta=hp.trades_beta, mart_beta=hp.mart_beta,
        budget=attack_config(hp) if hp.adv_train and hp.adv_loss != "pgd_ce" else None,
        teacher=teacher_fn() if distill else None,
        distill_temperature=hp.distill_temperature, loss_scale=loss_scale,
        sharpness=sharpness_wrapper(hp, network, masks),
        taps=measured.tap_model if measured is not None else None)

  defaults = Defaults(groups=lambda: optimizer_groups(hp, num_train), loss_grad_fn=standard)
  loss_grad_fn = experiment.loss_grad_fn(level, network, defaults)
  groups = experiment.optimizer_groups(level, network, num_train, defaults)
  return LevelEngine(Engine(
      network, loss_grad_fn, groups, x_train=dataset.x_train, y_train=dataset.y_train,
      batch_size=hp.batch_size, attack=attack, adv_train=hp.adv_train, adv_mix=hp.adv_mix,
      adv_loss=hp.adv_loss, trades_beta=hp.trades_beta, mart_beta=hp.mart_beta,
      augment=augment, prepare=dataset.prepare, decode=dataset.decode,
      decode_eval=dataset.decode_eval, grad_clip_norm=hp.grad_clip_norm,
      loss_scale=loss_scale, top5=top5,
      extra_state=masks.variables if masks else None, measurement=measured,
      eval_attacks=eval_attacks, distribution=distribution, compile=hp.compile), masks)


def attack(hp: Hparams) -> Callable:
  """`--attack`'s attack (`attacks.make_attack`)."""
  return make_attack(attack_config(hp))


# ---- checks ----------------------------------------------------------------------
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
  """Checks what the flags alone cannot: that the objects above can be built for
  `num_train` training images. Errors name the flag.

  Raises:
    ValueError: bad combinations (e.g. a schedule longer than training).
  """
  check_distribution(hp)
  measurements_lib.check_names(hp.measure)
  if hp.adv_loss != "pgd_ce" and not hp.adv_train:
    raise ValueError(f"--adv_loss={hp.adv_loss} is an adversarial training objective: it needs "
                     "--adv_train")
  if hp.log_every < 1:
    raise ValueError(f"--log_every must be a positive integer, got --log_every={hp.log_every}")
  saturation_lib.check_delta(hp.delta)
  if hp.lora_rank is not None and hp.experiment != "sparsify_finetune":
    raise ValueError(f"--lora_rank={hp.lora_rank} is for --experiment=sparsify_finetune, "
                     f"not --experiment={hp.experiment}")
  if hp.adv_train and hp.attack == "none":
    raise ValueError("--adv_train needs an --attack (fgsm or pgd), got --attack=none")
  if hp.batch_size > num_train:
    raise ValueError(f"--batch_size={hp.batch_size} is larger than the {num_train} "
                     "training images")
  total = hp.total_iterations(num_train)
  if hp.rewind_iteration >= total:
    raise ValueError(f"--rewind_iteration={hp.rewind_iteration} must be smaller than the "
                     f"{total} training iterations")
  optimizer_groups(hp, num_train)  # Raises on bad optimizer / schedule settings.
  _check_perturbation(hp)


def _check_perturbation(hp: Hparams):
  """`--optimizer=<perturbation>-<base>`, `--implicit` and their options: the method's own
  checks (`Perturbation.check`), then the options every method shares."""
  method = perturbation(hp)
  if hp.implicit and not (method is not None and method.implicit):
    takes = " or ".join(f"{name}-<base>" for name in PERTURBATIONS.names()
                        if PERTURBATIONS.get(name).implicit)
    raise ValueError(f"--implicit needs --optimizer={takes}, got --optimizer={hp.optimizer}")
  if method is not None:
    method.check(hp)
    check_sharpness_options(rho=hp.rho, bn_stats=hp.sam_bn_stats,
                            batch_splits=hp.sam_batch_splits, batch_size=hp.batch_size,
                            asam_rule=hp.asam_rule, ssam_norm=hp.ssam_norm)
