"""The hyper-parameters of an experiment, the flags generated from them, and the run folder.

Hyper-parameters are written once: grouped dataclasses (data, model, training,
pruning, attack, run) whose fields carry their help text and bounds in
`dataclasses.field(metadata=...)`. `define_flags` turns every field into an
absl flag (OpenLTH's habit), so a new option is one new field. `Hparams`
inherits every group, so its fields are flat (`hparams.learning_rate`) and
`hparams.json` stays a flat dict.

As in OpenLTH, a run's folder is a pure function of its hyper-parameters: a
readable prefix plus a hash of the fields that differ from their defaults
(plus the fields that name the folder), so adding a field with a default
leaves every existing folder where it is. Fields that only say where or how
much to run (`trials`, the data folder) are left out, so adding trials to a
finished run extends it.
"""

import dataclasses
import hashlib
import importlib
import json
import math
import os
from typing import Optional, Tuple

from robust_sparse.core import seed_defaults

# Fields that do not change the numbers of a trial.
NOT_HASHED = ("trials", "data_dir", "save_every_epochs", "masking_checks", "masking_examples")
# Always hashed, default or not: they name the folder, and hashing them keeps
# folders of different studies distinct when moved under one base folder.
REQUIRED = ("dataset", "model", "experiment", "attack", "adv_train")
# Experiments that measure a finished run (or a model) and attack nothing: their folder is
# `{experiment}/measurement/{hash}`, not `{attack}/natural_{hash}` (a test keeps this list
# equal to the registered `experiments.registry.Measurement` subclasses).
MEASUREMENT_EXPERIMENTS = ("receptive_field", "probes", "augmented_flatness", "relu_count")
MEASUREMENT_FOLDER = "measurement"
# ModelHparams fields passed to the model builder as options (None: unset).
MODEL_OPTIONS = ("vit_preset", "vit_variant", "patch_size", "depth", "heads", "width",
                 "mlp_width", "class_token", "db_mlp", "restricted_layer_norm",
                 "zeroth_bias_position", "zeroth_bias_clipping", "layer_norm_affine")


def _field(default, help, **flag):  # pylint: disable=redefined-builtin
  """A dataclass field whose metadata generates its flag.

  Args:
    default: the default value (immutable).
    help: the flag's help text.
    **flag: `short_name`, `lower_bound`, `upper_bound`, `choices` (a callable
      returning the allowed names: an enum flag), `flag_default` (shown and used
      by the flag when it differs from the dataclass default, e.g. None = auto).
  """
  return dataclasses.field(default=default, metadata=dict(help=help, **flag))


def _names(registry_path):
  """Lazily lists a registry's names (registries import TensorFlow)."""

  def names():
    module_name, attribute = registry_path.rsplit(".", 1)
    return importlib.import_module(module_name).__dict__[attribute].names()

  return names


def _normalizations():
  names = list(importlib.import_module("robust_sparse.models").NORMALIZATIONS)
  return names if "none" in names else ["none"] + names


@dataclasses.dataclass(frozen=True)
class DataHparams:
  """Which data, how much of it, in which batches."""
  dataset: str = _field("digits", "source data set", choices=_names("robust_sparse.data.DATASETS"))
  data_dir: Optional[str] = _field(
      None, "folder with the official raw files (mnist/, fashion-mnist/, "
      "cifar-10/cifar-10-batches-bin/); unset: $ROBUST_SPARSE_DATA_DIR, else "
      "tensorflow-datasets")
  valid_size: int = _field(
      10000, "validation set size: the first training images (10000; 300 for "
      "sklearn_digits); 0: no validation split (the CIFAR seeds evaluate on the test "
      "set only)", lower_bound=0, flag_default=None)
  resolution: Optional[int] = _field(
      None, "resize every image to RxR pixels, at training and test time (phd-lab); "
      "unset: the data set's own size", lower_bound=1)
  train_examples: Optional[int] = _field(
      None, "use only the first N training images (after the validation split; "
      "quick runs and tests); unset: all", lower_bound=1)
  batch_size: int = _field(60, "batch size", lower_bound=1)
  augment: str = _field(
      "none", "training-data augmentation: a comma-separated list applied in order, of "
      "crop (pad 4, random crop), flip, cutout (16 px, p 0.5), randaugment, mixup, "
      "cutmix; e.g. crop,flip,cutout")


@dataclasses.dataclass(frozen=True)
class ModelHparams:
  """The network."""
  model: str = _field("dense-300-100", "model architecture (see README), including any "
                      "wideresnet{depth}x{k}")
  activation: str = _field("relu", "hidden activation spec (see README)")
  l1_reg: float = _field(0.0, "L1 kernel penalty", short_name="l1", lower_bound=0.0)
  normalize: str = _field(
      "none", "per-channel normalisation as the model's first layer, so data and attack "
      "budgets stay in [0, 1] pixels: cifar (phd-lab), cifar_ssam (SSAM), imagenet",
      choices=lambda: _normalizations())
  dropout: float = _field(0.0, "dropout rate of the models that have one (wideresnet)",
                          lower_bound=0.0, upper_bound=1.0)
  # Model options: unset (None) is the model's own default; a model that does not
  # take an option that is set refuses it (models.registry.ModelEntry).
  vit_preset: Optional[str] = _field(
      None, "--model=vit: b16 (ViT-B/16), tiny (CPU-sized, 32 px) or mnist (28 px); "
      "unset: tiny", choices=lambda: ["b16", "tiny", "mnist"])
  vit_variant: Optional[str] = _field(
      None, "--model=vit: vanilla (ReLU MLPs) or sparsified (DB-MLP + jsrelu + restricted "
      "LayerNorm); unset: vanilla", choices=lambda: ["vanilla", "sparsified"])
  patch_size: Optional[int] = _field(None, "ViT patch size; unset: the preset's",
                                     lower_bound=1)
  depth: Optional[int] = _field(None, "ViT blocks / residual_mlp blocks; unset: the model's",
                                lower_bound=1)
  heads: Optional[int] = _field(None, "ViT attention heads; unset: the preset's", lower_bound=1)
  width: Optional[int] = _field(None, "ViT token width / residual_mlp width d; unset: the "
                                "model's", lower_bound=1)
  mlp_width: Optional[int] = _field(None, "ViT MLP hidden width; unset: the preset's",
                                    lower_bound=1)
  class_token: Optional[bool] = _field(None, "ViT: classify the class token (default); "
                                       "false: the mean token")
  db_mlp: Optional[bool] = _field(
      None, "ViT: add a zeroth bias to every MLP (DB-MLP); unset: the variant's (sparsified)")
  restricted_layer_norm: Optional[bool] = _field(
      None, "ViT: restrict every LayerNorm before an MLP; unset: the variant's (sparsified)")
  zeroth_bias_position: Optional[str] = _field(
      None, "DB-MLP: add the zeroth bias at the MLP input (the paper; default) or output "
      "(the released code, spec 2.4 [QUIRK])", choices=lambda: ["input", "output"])
  zeroth_bias_clipping: Optional[float] = _field(
      None, "DB-MLP: clip |b| <= c |gamma| of the LayerNorm before the MLP after every "
      "update; inf: unclipped (the seed's manipulate runs); unset: 0.1", lower_bound=0.0)
  layer_norm_affine: Optional[bool] = _field(
      None, "residual_mlp: LayerNorms with gamma and beta (default); false: the seed's "
      "--no-affine")


@dataclasses.dataclass(frozen=True)
class TrainingHparams:
  """How each level trains: length, optimizer, schedule, loss."""
  train_iters: int = _field(50000, "training iterations per prune iteration", lower_bound=1)
  epochs: Optional[float] = _field(
      None, "train for this many epochs instead of --train_iters (an epoch is "
      "ceil(training images / batch size) iterations; floor with --drop_last)",
      lower_bound=0.0)
  drop_last: bool = _field(
      False, "drop each epoch's last, smaller batch: floor(n / B) full batches per epoch, "
      "as PyTorch's DataLoader(drop_last=True), which SSAM's loader uses (its seed default); "
      "default: every example once per epoch, the last batch smaller")
  eval_every: Optional[int] = _field(
      None, "evaluate on the full validation and test sets every this many "
      "iterations (default: 500, or once per epoch with --epochs)", lower_bound=1)
  eval_examples: Optional[int] = _field(
      None, "intermediate evaluations use only the first N validation and test images "
      "(cheaper learning curves, e.g. with PGD); the last evaluation of every level uses "
      "the full sets; valid.csv and test.csv get a column `examples`", lower_bound=1)
  optimizer: str = _field(
      "adam", "optimizer: sgd | adam | adamw, or <perturbation>-<optimizer> for "
      "sharpness-aware training: sam-sgd, asam-sgd, sam-adam, ...")
  learning_rate: float = _field(0.0012, "learning rate", short_name="lr", lower_bound=0.0)
  momentum: float = _field(0.0, "SGD momentum", lower_bound=0.0)
  nesterov: bool = _field(False, "SGD with Nesterov momentum")
  weight_decay: float = _field(
      0.0, "weight decay as PyTorch applies it: added to the gradient for sgd/adam, "
      "decoupled for adamw", lower_bound=0.0)
  lr_schedule: str = _field("constant", "learning-rate schedule",
                            choices=_names("robust_sparse.training.schedules.SCHEDULES"))
  schedule_per: str = _field("epoch", "step the schedule once per epoch or every iteration",
                             choices=lambda: ["epoch", "iteration"])
  eta_min: float = _field(0.0, "cosine: final learning rate", lower_bound=0.0)
  milestones: Tuple[float, ...] = _field((), "multistep: epochs at which the rate is "
                                         "multiplied by --gamma, e.g. 100,150")
  gamma: float = _field(0.1, "multistep / step: decay factor", lower_bound=0.0)
  lr_step_epochs: Optional[float] = _field(None, "step: decay every this many epochs",
                                           lower_bound=0.0)
  warmup_epochs: float = _field(0.0, "linear warm-up length in epochs", lower_bound=0.0)
  warmup_init_lr: float = _field(0.0, "learning rate at the start of the warm-up",
                                 lower_bound=0.0)
  label_smoothing: float = _field(0.1, "label smoothing of the training loss (the seed "
                                  "uses 0.1)", lower_bound=0.0, upper_bound=1.0)
  grad_clip_norm: Optional[float] = _field(None, "clip gradients to this global norm",
                                           lower_bound=0.0)
  mixed_precision: bool = _field(False, "mixed_float16 compute with dynamic loss scaling")
  teacher_dir: Optional[str] = _field(
      None, "knowledge distillation from the finished run folder DIR (its trial 0, "
      "level 0): loss = CE + T^2 KL(teacher || student) at temperature T")
  distill_temperature: float = _field(4.0, "distillation temperature T", lower_bound=0.0)
  save_every_epochs: Optional[float] = _field(
      None, "also save the weights every this many epochs, to <level>/checkpoints/"
      "weights_<iteration>.npz (what --experiment=augmented_flatness reads); unset: only "
      "the initial and final weights. Does not change the run folder", lower_bound=0.0)


@dataclasses.dataclass(frozen=True)
class SharpnessHparams:
  """Sharpness-aware training (`--optimizer=sam-sgd`, `asam-sgd`, ...)."""
  rho: float = _field(0.05, "SAM / ASAM neighbourhood radius", lower_bound=0.0)
  asam_eta: float = _field(0.01, "ASAM: T_w = |w| + eta", lower_bound=0.0)
  asam_rule: str = _field(
      "official", "ASAM's T: |w| + eta on kernels and BN gamma, 1 on biases and BN beta "
      "(official, SamsungLabs/ASAM) or |w| on every weight, no eta (davda54, davda54/sam "
      "adaptive=True)", choices=lambda: ["official", "davda54"])
  ssam_norm: str = _field(
      "full", "SSAM-F / SSAM-D: e = rho m g / ||g|| with the whole gradient's norm (full, "
      "both Mi-Peng repositories, spec 4.2: ||e|| <= rho) or the masked gradient's (masked: "
      "||e|| = rho)", choices=lambda: ["full", "masked"])
  sam_batch_splits: int = _field(1, "m-sharpness: one perturbation per split of the batch",
                                 lower_bound=1)
  sharpness_examples: int = _field(
      1000, "at every evaluation, measure the sharpness (loss at w + e minus loss at w, "
      "radius --sharpness_rho) and the m-sharpness (m = --batch_size) on the first N "
      "training images, for every optimizer (train.csv); 0: off", lower_bound=0)
  sharpness_rho: float = _field(
      0.05, "radius of the measured sharpness: one value for every run (not --rho), so "
      "SGD, SAM and SSAM runs compare", lower_bound=0.0)
  sam_bn_stats: str = _field(
      "first", "batch-norm statistics of SAM's clean pass (first), perturbed pass "
      "(second) or both in turn (the SSAM seed)", choices=lambda: ["first", "second", "both"])
  sparsity: float = _field(0.2, "SSAM: fraction of the weights NOT perturbed; "
                           "--experiment=hydra: fraction of each masked layer's weights pruned",
                           lower_bound=0.0, upper_bound=1.0)
  num_samples: int = _field(1024, "SSAM-F: training examples per Fisher estimate",
                            lower_bound=1)
  update_freq: int = _field(5, "SSAM: refresh the perturbation mask every this many epochs",
                            lower_bound=1)
  pattern: str = _field("unstructured", "SSAM-F mask: global top-k, whole tensors, or N:M",
                        choices=lambda: ["unstructured", "structured", "nm"])
  n_structured: Optional[int] = _field(None, "SSAM-F N:M: N kept of every M", lower_bound=1)
  m_structured: Optional[int] = _field(None, "SSAM-F N:M: group size M", lower_bound=1)
  nm_conv_layout: str = _field(
      "correct", "SSAM-F N:M conv masks: grouped along each filter's inputs (correct) or "
      "the released code's scrambled reshape (seed, spec 4.2 [BUG])",
      choices=lambda: ["correct", "seed"])
  drop_rate: float = _field(0.5, "SSAM-D: initial drop rate (cosine to 0)", lower_bound=0.0,
                            upper_bound=1.0)
  drop_strategy: str = _field("gradient", "SSAM-D: which live entries die",
                              choices=lambda: ["gradient", "weight", "random"])
  growth_strategy: str = _field("random", "SSAM-D: which dead entries grow",
                                choices=lambda: ["random", "gradient", "weight"])
  implicit: bool = _field(
      False, "implicit sparse perturbation (spec 4.4) with --optimizer=sam-<base>: SAM's "
      "ascent pass back-propagates through the conv kernels (not dense layers) times a "
      "Fisher mask of --pattern "
      "structured or nm, refreshed every --update_freq epochs")


@dataclasses.dataclass(frozen=True)
class MeasureHparams:
  """Measurements taken during training, fed from the training step (no extra pass)."""
  measure: Tuple[str, ...] = _field(
      (), "comma list of measurements: saturation (delve: per conv / dense layer, train and "
      "test, each evaluation period); activation_sparsity (per activation layer: zero-region "
      "fraction, pre-activation concentration, mean f'(x)^2), effective_gradient_sparsity "
      "and spectral_increase (these two on training batches only: they need dL/da)")
  log_every: int = _field(
      1, "activation measurements: measure every Nth training step, counted from each "
      "evaluation (the first <= 1024 natural examples of the batch)", lower_bound=1)
  delta: float = _field(0.99, "saturation: explained-variance threshold of the intrinsic "
                        "dimensionality, in (0, 1]", lower_bound=0.0, upper_bound=1.0)
  saturation_downsampling: Optional[int] = _field(
      None, "saturation: nearest-resize conv outputs larger than DxD to DxD first (phd-lab "
      "configs: 1, spec 5.1 [QUIRK]); unset: no resize", lower_bound=1)
  saturation_rule: str = _field(
      "delve", "saturation: delve = the count of cumulative variance ratios below --delta, as "
      "delve's code returns it (the paper's numbers; 0 for a layer without variance); "
      "intended = delve's docstring rule (k = 0 becomes 1, one more direction when the last "
      "ratio is more than 0.02 short of --delta)", choices=lambda: ["delve", "intended"])
  top5: bool = _field(False, "also log top-5 accuracy for data sets with 10 classes or fewer "
                      "(always logged above 10)")
  phd_lab_csv: bool = _field(
      False, "also write phd-lab's ';'-separated per-epoch CSV ({Model}-{Dataset}-r{res}-bs{B}"
      "-e{E}.csv: accuracies, losses, saturation columns) in each level's folder")
  pixelwise_probes: bool = _field(
      False, "probes: also one probe per spatial position of every conv map "
      "(pixelwise_probe_performances.csv; heat maps in the analysis)")
  probes: bool = _field(
      False, "after training, fit linear probes on every layer of trial 0's final network "
      "(as --experiment=probes); results in the run folder")
  probe_pool: Tuple[float, ...] = _field(
      (4.0,), "probes: adaptive-average-pool each conv map to DxD before the linear probe; "
      "a comma list fits one set of probes per size")
  probe_train_mode: bool = _field(
      True, "probes: extract the training set's latents in training mode (BN batch "
      "statistics, as phd-lab); false: inference mode")
  probe_augment: bool = _field(
      True, "probes: read the training set as phd-lab's training loader does: shuffled, "
      "through the training augmentation (--augment), in batches of --probe_batch_size; "
      "false: un-augmented, in order")
  probe_batch_size: Optional[int] = _field(
      None, "probes: training-set batch size of the latent extraction (it sets the batch "
      "statistics of train-mode batch norm); unset: --batch_size, as phd-lab (64 in its "
      "configs)", lower_bound=1)
  probe_jobs: int = _field(2, "probes: logistic regressions fitted in parallel",
                           lower_bound=1)


@dataclasses.dataclass(frozen=True)
class SparsifyHparams:
  """Fine-tuning a finished vanilla ViT into the sparsified one (`sparsify_finetune`)."""
  mixed_activation: bool = _field(
      True, "sparsify_finetune: move the MLP activation from relu to jsrelu, (1-k) relu + "
      "k jsrelu with k rising linearly over --activation_mixing_epochs; false: jsrelu at once")
  activation_mixing_epochs: float = _field(
      10.0, "sparsify_finetune: epochs over which k rises from 0 to 1", lower_bound=0.0)
  layernorm_uplifting_epochs: float = _field(
      10.0, "sparsify_finetune: the restricted LayerNorms lift |gamma| to at least "
      "min(step / U, 1), U = this many epochs", lower_bound=0.0)
  lora_rank: Optional[int] = _field(
      None, "sparsify_finetune: LoRA of this rank on every dense layer of the encoder "
      "blocks (Keras' enable_lora: their kernels freeze); unset: full fine-tuning",
      lower_bound=1)


@dataclasses.dataclass(frozen=True)
class PruningHparams:
  """The experiment and its pruning levels."""
  experiment: str = _field("reinit_orig", "the experiment to run",
                           choices=_names("robust_sparse.experiments.EXPERIMENTS"))
  prune_iters: int = _field(20, "number of pruning iterations", lower_bound=0)
  prune_rate: float = _field(0.2, "fraction of the active weights pruned per iteration "
                             "(hidden layers; all layers with --prune_scope=global)",
                             lower_bound=0.0, upper_bound=1.0)
  prune_rate_output: float = _field(0.1, "prune rate of the output layer (layer scope)",
                                    lower_bound=0.0, upper_bound=1.0)
  prune_scope: str = _field("layer", "rank weights within each layer or across all layers",
                            choices=lambda: ["layer", "global"])
  rewind_to: str = _field("init", "reinit_orig: reset to the random init (the lottery "
                          "ticket), or to the trained dense weights as the seed's released "
                          "code does", choices=lambda: ["init", "trained_dense"])
  rewind_iteration: int = _field(0, "rewind: iteration of the dense run whose weights "
                                 "pruned runs start from", lower_bound=0)
  ticket_run: Optional[str] = _field(
      None, "random_reinit / random_prune: the reinit_orig run folder DIR whose masks "
      "(random_reinit: with a fresh initialisation) or per-layer counts (random_prune: "
      "random masks from the original initialisation) each level takes")
  score_lr: float = _field(
      0.1, "hydra: SGD learning rate of the importance scores in the score phase (prune_iter_0, "
      "--mask_epochs long, cosine; --momentum, --nesterov and --weight_decay as the weights')",
      lower_bound=0.0)


@dataclasses.dataclass(frozen=True)
class ReLUHparams:
  """ReLU reduction (`--experiment=relu_prune`, AutoReP): learned masks on the ReLU sites.

  The weights' optimizer flags keep their toolkit names: AutoReP's --w_lr,
  --w_momentum, --w_weight_decay and --w_lr_min are --learning_rate,
  --momentum, --weight_decay and --eta_min; the mask phase has its own
  --w_mask_lr and --w_mask_weight_decay (AutoReP runs the phases as two
  commands with different --w_weight_decay).
  """
  pretrained_run: Optional[str] = _field(
      None, "the finished run folder DIR (its trial 0, level 0) whose final weights "
      "relu_prune and hydra start from, or probes analyses")
  relu_sparsity: Optional[float] = _field(
      None, "relu_prune: fraction of the ReLUs to remove (target density 1 - s); or give "
      "--relu_count", lower_bound=0.0, upper_bound=1.0)
  relu_count: Optional[float] = _field(
      None, "relu_prune: ReLU budget in thousands (AutoReP's --ReLU_count): target density "
      "= 1000 * count / the model's ReLUs", lower_bound=0.0)
  mask_epochs: float = _field(
      10.0, "relu_prune phase 1: epochs of mask training (Adam on the mask logits with "
      "the density penalty, then SGD on the weights, per batch); hydra: epochs of the score "
      "phase", lower_bound=0.0)
  relu_replacement: str = _field(
      "identity", "relu_prune: what a closed ReLU computes: identity, identity_relu_grad "
      "(spgrad), poly, autopoly1, autopoly2, trainable_poly, trainable_poly1",
      choices=_names("robust_sparse.nn.relu_masks.REPLACEMENTS"))
  relu_forward: str = _field(
      "intended", "relu_prune: y = m relu(x) + (1-m) g(x) (intended), or g(relu(x)) as the "
      "released code's in-place relu computes (spec 3.2 [BUG])",
      choices=lambda: ["intended", "released"])
  scale_x2: float = _field(0.1, "relu_prune poly: x^2 coefficient (trainable_poly: its scale)")
  scale_x: float = _field(0.5, "relu_prune poly: x coefficient")
  hysteresis_threshold: float = _field(
      0.0, "relu_prune: hysteresis ('relay') threshold t: an open gate closes once "
      "alpha < -t, a closed one opens once alpha > t; 0: the plain gate", lower_bound=0.0)
  mask_dropout: float = _field(
      0.0, "relu_prune phase 2: probability per site and call of computing plain relu",
      lower_bound=0.0, upper_bound=1.0)
  lamda: float = _field(10.0, "relu_prune: weight of the penalty max(0, density - target)",
                        lower_bound=0.0)
  alpha_lr: float = _field(2e-4, "relu_prune: Adam learning rate of the mask logits "
                           "(cosine to 0 over the mask phase)", lower_bound=0.0)
  alpha_weight_decay: float = _field(1e-3, "relu_prune: L2 weight decay of the mask logits",
                                     lower_bound=0.0)
  w_mask_lr: float = _field(
      0.02, "relu_prune phase 1: SGD learning rate of the weights (cosine to --eta_min); "
      "phase 2 uses --learning_rate and --lr_schedule", lower_bound=0.0)
  w_mask_weight_decay: float = _field(
      5e-4, "relu_prune phase 1: weight decay of the weights (phase 2: --weight_decay)",
      lower_bound=0.0)


@dataclasses.dataclass(frozen=True)
class FlatnessHparams:
  """Augmented flatness (`--experiment=augmented_flatness`): which samples it measures, how.

  Its batches are `--batch_size` images; the protocol is the seed's
  (learning rate 0, weight decay 0: nothing is updated).
  """
  correct_samples_only: bool = _field(
      False, "augmented_flatness: only the samples the checkpoint classifies correctly enter "
      "the loss (the seed's CIFAR protocol); the gradient terms are divided by the accuracy, "
      "as the seed's notebook does")
  max_iterations: Optional[int] = _field(
      None, "augmented_flatness: measure at most this many batches of --batch_size "
      "per checkpoint (the seed's ImageNet protocol: 128); unset: one epoch of the training "
      "set (--flatness_data=train, the seed's CIFAR protocol) or the whole test set",
      lower_bound=1)
  flatness_data: str = _field(
      "train", "augmented_flatness: train = the seed's protocol (training batches through "
      "--augment, model in training mode, batch-mean loss with --label_smoothing); test = "
      "the test set in inference mode with each sample's own plain cross-entropy",
      choices=lambda: ["train", "test"])
  flatness_loss_scale: float = _field(
      1.0, "augmented_flatness: multiply the loss by this before taking G (the seed's AMP "
      "loss scale 65536 reproduces its logged values, 2^32 times the unscaled ones)",
      lower_bound=0.0)


@dataclasses.dataclass(frozen=True)
class AttackHparams:
  """The attack used for adversarial training and evaluation.

  Its defaults are `robust_sparse.attacks.AttackConfig`'s too (the seed's);
  `robust_sparse.experiments.build` turns these fields into attacks.
  """
  attack: str = _field("fgsm", "adversarial attack used for training and evaluation",
                       choices=_names("robust_sparse.attacks.ATTACKS"))
  attack_impl: str = _field("native", "native compiled attacks, or cleverhans' "
                            "functions as the seed used",
                            choices=lambda: ["native", "cleverhans"])
  eps: float = _field(0.3, "L-infinity attack budget", lower_bound=0.0)
  pgd_step_size: float = _field(0.05, "PGD step size", lower_bound=0.0)
  pgd_steps: int = _field(10, "PGD steps", lower_bound=0)
  attack_labels: str = _field(
      "predicted", "attack the model's own predictions (the seed's, cleverhans y=None) or "
      "the true labels (standard robust accuracy), in training and evaluation",
      choices=lambda: ["predicted", "true"])
  eval_attacks: str = _field(
      "", "more attacks at every evaluation, each adding adv_acc_<name> (clean and "
      "adversarial both correct) to valid.csv / test.csv: a comma list of specs such as "
      "fgsm, pgd(steps=50,restarts=5), pgd(norm=2,eps=1.5), apgd_ce; unset parameters "
      "take --eps, --pgd_step_size, --pgd_steps")
  adv_train: bool = _field(False, "use adversarial training for the given attack")
  adv_mix: float = _field(0.5, "weight of the adversarial loss in adversarial training",
                          lower_bound=0.0, upper_bound=1.0)
  adv_loss: str = _field(
      "pgd_ce", "the adversarial training objective with --adv_train: pgd_ce (cross-entropy "
      "on --attack's examples, mixed with the natural loss by --adv_mix), trades (Zhang et al. "
      "2019: natural cross-entropy + --trades_beta x KL(natural || adversarial), the inner "
      "maximisation of that KL), mart (Wang et al. 2020: boosted cross-entropy on adversarial "
      "examples + --mart_beta x KL weighted by 1 - p_y(natural))",
      choices=lambda: ["pgd_ce", "trades", "mart"])
  trades_beta: float = _field(6.0, "--adv_loss=trades: weight of the KL term (the paper's "
                              "1/lambda; 6.0 in its CIFAR-10 runs)", lower_bound=0.0)
  mart_beta: float = _field(6.0, "--adv_loss=mart: weight of the misclassification-aware KL "
                            "term (6.0 in the paper's CIFAR-10 runs)", lower_bound=0.0)
  masking_checks: Optional[bool] = _field(
      None, "at the end of every level, attack the final network with the gradient-masking "
      "checks (FGSM, PGD, PGD with 5x the steps and 5 restarts, PGD at eps 1; true labels) "
      "on the first --masking_examples test images and keep the results in the level's "
      "folder (masking.json, masking_examples.npz), which run_analysis reads; unset: on for "
      "adversarially trained runs. Does not change the run folder")
  masking_examples: int = _field(
      500, "test images the gradient-masking checks attack (the first N). Does not change "
      "the run folder", lower_bound=1)
  eps_sweep: Tuple[float, ...] = _field(
      (), "robust accuracy against epsilon: at the end of every level, attack each trial's "
      "final network with --eps_sweep_attack at each of these budgets (e.g. "
      "0,0.05,0.1,0.2,0.3; increasing) on the first --eps_sweep_examples test images, true "
      "labels, into the level's eps_sweep.json; run_analysis draws the curves and their area "
      "(experiments/eps_sweep.py)")
  eps_sweep_attack: str = _field(
      "pgd", "--eps_sweep's attack, an --eval_attacks spec without eps (e.g. pgd, "
      "pgd(steps=50,restarts=5), apgd_ce, autoattack); its step size scales with the budget "
      "(step_size x eps / --eps)")
  eps_sweep_examples: int = _field(1000, "test images --eps_sweep attacks (the first N)",
                                   lower_bound=1)


@dataclasses.dataclass(frozen=True)
class DistributionHparams:
  """Data-parallel training of one run on several devices (`robust_sparse.training.distribute`)."""
  distribution: str = _field(
      "default", "default: one device; mirrored: tf.distribute.MirroredStrategy over the "
      "visible GPUs (--devices) or --cpu_replicas logical CPU devices, each step's global "
      "--batch_size split evenly over the replicas", choices=lambda: ["default", "mirrored"])
  cpu_replicas: int = _field(
      0, "--distribution=mirrored over N >= 2 logical devices made from the host CPU (for "
      "testing without GPUs); 0: the GPUs", lower_bound=0)
  sync_batch_norm: bool = _field(
      False, "--distribution=mirrored: batch normalisation with the global batch's "
      "statistics (Keras synchronized=True); default: each replica's own shard's")
  sam_sync: bool = _field(
      False, "--distribution=mirrored with SAM / ASAM / SSAM: perturb with the gradient "
      "summed over the replicas (the single-device e); default: each replica with its own "
      "shard's gradient, as google-research/sam")


@dataclasses.dataclass(frozen=True)
class RunHparams:
  """Repetitions and randomness."""
  trials: int = _field(10, "number of trials per experiment", lower_bound=1)
  seed: int = _field(0, "random seed; fixed seeds give identical results", lower_bound=0)
  deterministic: bool = _field(False, "TensorFlow op determinism, so GPU runs repeat "
                               "exactly too (slower on GPU)")
  compile: str = _field(
      "auto", "how training and evaluation compile (robust_sparse/training/compilation.py): "
      "xla_loop (a chunk of steps is one XLA loop), xla_step (an XLA call per step), graph "
      "(a tf.function per step, TensorFlow's own kernels), auto (no XLA for convolutions on "
      "a CPU, except natural training at batch <= 8, where it times xla_step against graph "
      "and keeps the faster in the run's compile.json; metadata.json records the choice)",
      choices=lambda: ["auto", "xla_loop", "xla_step", "graph"])


GROUPS = (DataHparams, ModelHparams, TrainingHparams, SharpnessHparams, MeasureHparams,
          SparsifyHparams, PruningHparams, ReLUHparams, FlatnessHparams, AttackHparams,
          DistributionHparams, RunHparams)


@dataclasses.dataclass(frozen=True)
class Hparams(RunHparams, DistributionHparams, AttackHparams, FlatnessHparams, ReLUHparams,
              PruningHparams, SparsifyHparams, MeasureHparams, SharpnessHparams,
              TrainingHparams, ModelHparams, DataHparams):
  """Everything that defines an experiment (defaults: the lottery-ticket seed's)."""

  def __post_init__(self):
    # JSON gives lists and notebooks give ints for floats: normalise, so that
    # `epochs=200` and `epochs=200.0` name the same run folder.
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if _flag_kind(field) == "list":
        item = _list_item_type(field)
        object.__setattr__(self, field.name, tuple(item(v) for v in value))
      elif (_flag_kind(field) == "float" and isinstance(value, int)
          and not isinstance(value, bool)):
        object.__setattr__(self, field.name, float(value))

  def model_options(self) -> dict:
    """The model options that are set, for `models.build_model`."""
    return {name: getattr(self, name) for name in MODEL_OPTIONS
            if getattr(self, name) is not None}

  def to_dict(self):
    values = dataclasses.asdict(self)
    for field in dataclasses.fields(self):
      if _flag_kind(field) == "list":
        values[field.name] = list(values[field.name])
    return values

  @classmethod
  def with_seed_defaults(cls, **values) -> "Hparams":
    """As the command line builds it: the fields not in `values` take the matching seed's
    defaults (`robust_sparse.core.seed_defaults`, e.g. AutoReP's for `relu_prune`), then their
    own. `Hparams(**values)` takes the lottery-ticket defaults for every unset field."""
    return cls(**seed_defaults.apply({**cls().to_dict(), **values}, values))

  @classmethod
  def from_dict(cls, values):
    """Builds from a (possibly older) `hparams.json`: missing fields take their defaults.

    Raises:
      ValueError: a key that is not a field.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown hyper-parameters: {', '.join(unknown)}")
    return cls(**values)

  # ---- length ----------------------------------------------------------------
  def steps_per_epoch(self, num_train: int) -> int:
    if self.drop_last:
      return max(1, num_train // self.batch_size)
    return max(1, math.ceil(num_train / self.batch_size))

  def total_iterations(self, num_train: int) -> int:
    """Iterations per level: `train_iters`, or `epochs` epochs of `num_train` images."""
    if self.epochs is None:
      return self.train_iters
    return max(1, int(round(self.epochs * self.steps_per_epoch(num_train))))

  def eval_interval(self, num_train: int) -> int:
    if self.eval_every is not None:
      return self.eval_every
    return self.steps_per_epoch(num_train) if self.epochs is not None else 500

  # ---- the run folder ----------------------------------------------------------
  def hashed_fields(self):
    """The fields the folder's hash covers: those off their default, plus `REQUIRED`."""
    defaults = type(self)().to_dict()
    return {k: v for k, v in self.to_dict().items()
            if k not in NOT_HASHED and (k in REQUIRED or v != defaults[k])}

  def digest(self) -> str:
    payload = json.dumps(self.hashed_fields(), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]

  def run_dir(self, base_dir: str) -> str:
    """`{base_dir}/{dataset}/{model}/{experiment}/{attack}/{natural|adv}_{hash}`.

    A measurement experiment (`MEASUREMENT_EXPERIMENTS`: it trains and attacks
    nothing) is filed as what it is: `.../{experiment}/measurement/{hash}`, the
    same hash.
    """
    if self.experiment in MEASUREMENT_EXPERIMENTS:
      return os.path.join(base_dir, self.dataset, self.model, self.experiment,
                          MEASUREMENT_FOLDER, self.digest())
    mode = "adv" if self.adv_train else "natural"
    return os.path.join(base_dir, self.dataset, self.model, self.experiment, self.attack,
                        f"{mode}_{self.digest()}")


# ---- flags ---------------------------------------------------------------------
def _flag_kind(field):
  kind = field.type
  if isinstance(kind, str):
    kind = eval(kind)  # pylint: disable=eval-used
  optional = getattr(kind, "__origin__", None) is not None and type(None) in kind.__args__
  if optional:
    kind = [a for a in kind.__args__ if a is not type(None)][0]
  if getattr(kind, "__origin__", None) in (tuple, Tuple):
    return "list"
  return {bool: "bool", int: "integer", float: "float", str: "string"}[kind]


def _list_item_type(field):
  """The element type of a `Tuple[T, ...]` field (float or str)."""
  kind = field.type
  if isinstance(kind, str):
    kind = eval(kind)  # pylint: disable=eval-used
  return kind.__args__[0]


def define_flags(flags_module, flag_values):
  """Defines one absl flag per `Hparams` field on `flag_values`.

  Args:
    flags_module: `absl.flags`.
    flag_values: the `FlagValues` to define them on (the entry point's FLAGS).
  """
  for group in GROUPS:
    for field in dataclasses.fields(group):
      meta = field.metadata
      default = meta.get("flag_default", field.default)
      kwargs = dict(flag_values=flag_values)
      if "short_name" in meta:
        kwargs["short_name"] = meta["short_name"]
      kind = _flag_kind(field)
      help_text = f"{meta['help']} [{group.__name__}]"
      if "choices" in meta:
        flags_module.DEFINE_enum(field.name, default, meta["choices"](), help_text, **kwargs)
      elif kind == "bool":
        flags_module.DEFINE_bool(field.name, default, help_text, **kwargs)
      elif kind == "list":
        flags_module.DEFINE_list(field.name, list(map(str, default)), help_text, **kwargs)
      else:
        define = getattr(flags_module, f"DEFINE_{kind}")
        if kind in ("integer", "float"):
          for bound in ("lower_bound", "upper_bound"):
            if bound in meta:
              kwargs[bound] = meta[bound]
        define(field.name, default, help_text, **kwargs)


def from_flags(flag_values, fallbacks=None, **overrides) -> Hparams:
  """The `Hparams` of parsed flags (`overrides` replace resolved values).

  Fields whose flag is not given take the matching seed's defaults
  (`robust_sparse.core.seed_defaults`), then `fallbacks` ({field: value}), then the
  flag's default.

  Raises:
    ValueError: an unparsable list value, naming its flag.
  """
  values = {}
  for field in dataclasses.fields(Hparams):
    value = flag_values[field.name].value
    if _flag_kind(field) == "list" and _list_item_type(field) is float:
      try:
        value = tuple(float(v) for v in value)
      except ValueError:
        raise ValueError(f"--{field.name}={','.join(value)}: expected numbers") from None
    values[field.name] = value
  values.update(overrides)
  explicit = {f.name for f in dataclasses.fields(Hparams) if flag_values[f.name].present}
  return Hparams(**seed_defaults.apply(values, explicit | set(overrides), fallbacks))
