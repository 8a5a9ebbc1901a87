"""HYDRA robust pruning (`--experiment=hydra`; Sehwag et al., NeurIPS 2020).

`--experiment=hydra --pretrained_run=RUN --sparsity=S` starts from RUN's
trial 0, level 0 final weights (an adversarially trained dense network of the
same data set and model) and prunes every masked layer (the layers the lottery
experiments prune, output layer included) to a fraction 1 - S of its weights,
layer by layer (HYDRA's default top-k per layer). Each trial has two levels,
each a folder of the lottery layout:

  prune_iter_0  the score phase, `--mask_epochs` epochs. Every masked layer
                gets an importance score per weight, initialised as HYDRA's
                `--scaled-score-init` from the pretrained kernel
                (sqrt(6 / fan_in) * w / max|w|: the first top-k is magnitude
                pruning), and computes with w * topk(|s|), the gradient passed
                straight through to the scores (`robust_sparse.nn.scores`).
                The kernels and biases are frozen; SGD (`--score_lr`,
                `--momentum`, `--nesterov`, `--weight_decay`, cosine over the
                phase) trains the scores and, as HYDRA does by default (its
                freeze_bn off), the batch-norm scales and offsets, on the
                run's robust loss (`--adv_train` with `--attack`, `--adv_mix`,
                and `--adv_loss`). Its `masks/` are the final top-k
                (rewritten when the level finishes; all ones while it runs),
                and `metadata.json` counts them; its evaluations are the
                top-k network's.
  prune_iter_1  fine-tuning, `--epochs` (0: none): the masks fixed to the
                score phase's final top-k, the weights trained from that
                phase's final values (the pretrained kernels, HYDRA's
                fine-tuning from its pruning checkpoint) with the flags'
                optimizer and schedule (HYDRA: `--optimizer=sgd
                --learning_rate=0.01 --lr_schedule=cosine`) and the same
                robust loss; the masks' constraint keeps pruned weights at 0.

`percent_weights_remaining` of both levels is 100 * (1 - S) over the masked
layers (exactly: each layer keeps n - int(S n) of its n weights). HYDRA's
defaults (20 + 20 epochs, score lr 0.1, fine-tuning lr 0.01, momentum 0.9,
weight decay 1e-4, batch 128) are the seed defaults
(`robust_sparse.core.seed_defaults`).
"""

import os

import keras
import numpy as np

from robust_sparse.core import files
from robust_sparse.core.run_folder import finished_run
from robust_sparse.core.hparams import MODEL_OPTIONS
from robust_sparse.experiments.registry import EXPERIMENTS, MaskPhaseExperiment
from robust_sparse.nn import pruning
from robust_sparse.nn import scores as scores_lib
from robust_sparse.training.optimizers import TorchSGD, split_optimizer
from robust_sparse.training.schedules import make_schedule
from robust_sparse.training.steps import OptimizerGroup

# Fields whose values must be the pretrained run's: they decide the network.
_SAME_AS_PRETRAINED = ("dataset", "model", "resolution", "normalize", "activation",
                       "dropout") + MODEL_OPTIONS
_SCORES = "/scores"


def _kernel_path(score_path: str) -> str:
  return score_path[:-len(_SCORES)] + "/kernel"


@EXPERIMENTS.register("hydra")
class Hydra(MaskPhaseExperiment):
  """HYDRA's score phase then robust fine-tuning (see the module docstring)."""

  mask_phase = "the score phase"
  prunes = False

  def __init__(self, hparams):
    super().__init__(hparams)
    self._pretrained = None
    self._fine_tune_masks = None

  @property
  def keep_fraction(self) -> float:
    return 1.0 - self.hparams.sparsity

  # ---- checks -------------------------------------------------------------------
  def check(self, dataset, num_train):
    super().check(dataset, num_train)
    hp = self.hparams
    if not 0.0 < hp.sparsity < 1.0:
      raise ValueError(f"--sparsity (hydra: the fraction of the weights pruned) must be in "
                       f"(0, 1), got {hp.sparsity}")
    perturbation, _ = split_optimizer(hp.optimizer)
    if perturbation is not None or hp.implicit:
      raise ValueError(f"hydra trains without a sharpness perturbation; --optimizer="
                       f"{hp.optimizer}{' --implicit' if hp.implicit else ''} is not supported "
                       "(and --sparsity is hydra's here)")
    if not hp.pretrained_run:
      raise ValueError("hydra needs --pretrained_run=DIR, a finished (adversarially "
                       "trained) dense run")
    pretrained_hp, weights = finished_run(hp.pretrained_run, "--pretrained_run")
    for name in _SAME_AS_PRETRAINED:
      theirs, ours = getattr(pretrained_hp, name), getattr(hp, name)
      if theirs != ours:
        raise ValueError(f"--pretrained_run={hp.pretrained_run} was trained with "
                         f"--{name}={theirs}, not --{name}={ours}")
    self._pretrained = weights

  def phase(self, level):
    return "score" if level == 0 else "finetune"

  # ---- the model and where each level starts ----------------------------------------
  def transform_model(self, model, trial, level):
    if level == 0:
      return scores_lib.with_scores(model, self.keep_fraction)
    return model

  def start(self, level, history, fresh):
    if level == 0:
      run = self.hparams.pretrained_run
      extra = sorted(set(self._pretrained) - set(fresh))
      missing = sorted(p for p in set(fresh) - set(self._pretrained)
                       if not p.endswith(_SCORES))
      if extra or missing:
        raise ValueError(f"--pretrained_run={run} does not fit the model: "
                         + ", ".join((["has " + ", ".join(extra[:3])] if extra else [])
                                     + (["lacks " + ", ".join(missing[:3])] if missing else [])))
      weights = dict(self._pretrained)
      for path in fresh:
        if path.endswith(_SCORES):
          weights[path] = np.asarray(keras.ops.convert_to_numpy(
              scores_lib.scaled_score_init(self._pretrained[_kernel_path(path)])))
      return weights, 0
    # Fine-tuning: the score phase's final weights (its kernels are the pretrained
    # ones, its batch-norm parameters trained with the scores), masked by its top-k.
    final = history.final_weights(0)
    self._fine_tune_masks = self._final_masks(final)
    return {path: value for path, value in final.items() if not path.endswith(_SCORES)}, 0

  def _final_masks(self, weights):
    """{layer: the level's own mask times the top-k of its scores} from saved weights."""
    masks = {}
    for path, value in weights.items():
      if path.endswith(_SCORES):
        layer = path[:-len(_SCORES)]
        kept = keras.ops.convert_to_numpy(scores_lib.topk_mask(value, self.keep_fraction))
        masks[layer.split("/")[-1]] = (kept * weights[layer + "/mask"]).astype(np.float32)
    return masks

  def level_masks(self, trial, level, layers):
    if level == 0:
      return None  # The pretrained network's own (dense); the scores select within them.
    return {layer.name: self._fine_tune_masks[layer.name] for layer in layers}

  # ---- training -------------------------------------------------------------------
  def mask_phase_groups(self, model, num_train, defaults):
    hp = self.hparams
    schedule = make_schedule(
        "cosine", hp.score_lr, total_iterations=self.total_iterations(0, num_train),
        steps_per_epoch=hp.steps_per_epoch(num_train), per=hp.schedule_per,
        eta_min=hp.eta_min)
    # HYDRA's prune mode freezes every weight and bias but the batch-norm layers'.
    trained = {id(layer.scores) for layer in scores_lib.scored_layers(model)}
    for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
      if isinstance(layer, keras.layers.BatchNormalization):
        trained.update(id(v) for v in layer.trainable_variables)
    return [OptimizerGroup("scores", TorchSGD(hp.score_lr, momentum=hp.momentum,
                                              nesterov=hp.nesterov,
                                              weight_decay=hp.weight_decay),
                           schedule, predicate=lambda variable: id(variable) in trained)]

  # ---- what a level records ---------------------------------------------------------
  def metadata(self, level, model, directory, logs):
    values = {"hydra_phase": "score" if level == 0 else "finetune",
              "sparsity": self.hparams.sparsity}
    if level == 1:
      return values
    # The score phase trained the top-k network: its masks are the final top-k.
    layers = scores_lib.scored_layers(model)
    masks = {layer.name: (keras.ops.convert_to_numpy(layer.score_mask())
                          * layer.mask.numpy()).astype(np.float32) for layer in layers}
    for name, mask in masks.items():
      files.save_npy(os.path.join(directory, "masks", f"{name}.npy"), mask)
    remaining = int(sum(m.sum() for m in masks.values()))
    total = int(sum(m.size for m in masks.values()))
    # How much of the learned sub-network magnitude pruning (the initial top-k) keeps too.
    magnitude = {layer.name: keras.ops.convert_to_numpy(scores_lib.topk_mask(
        layer.raw_kernel * layer.mask, self.keep_fraction)) for layer in layers}
    shared = sum(float((masks[n] * magnitude[n]).sum()) for n in masks)
    return {**values,
            "percent_weights_remaining": pruning.percent_remaining(masks),
            "weights_remaining": remaining, "weights_total": total,
            "layer_weights_remaining": {name: int(m.sum()) for name, m in masks.items()},
            "kept_by_magnitude_pruning_too": shared / max(remaining, 1)}
