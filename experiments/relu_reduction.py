"""ReLU reduction for private inference (AutoReP, spec section 3): `relu_count`, `relu_prune`.

`--experiment=relu_count` builds `--model` for `--dataset`, writes the ReLU
elements of every activation site and their total to `relu_counts.csv` in the
run folder, and prints `relu count: <total>` last.

`--experiment=relu_prune` starts from the finished baseline run
`--pretrained_run` (its trial 0, level 0), replaces every ReLU site with a
`MaskedReLU` (`robust_sparse.nn.relu_masks`) and trains in two levels of one
trial, each a folder of the usual layout:

  prune_iter_0  the mask phase, `--mask_epochs` epochs. Per batch, AutoReP's
                alternating update: an Adam step on the mask logits (alpha)
                for CE + lamda * max(0, density - target) (`--alpha_lr`,
                betas (0.5, 0.999), PyTorch's eps 1e-8, `--alpha_weight_decay`,
                cosine to 0),
                then a second forward pass and an SGD step on the weights for
                CE [+ distillation] (`--w_mask_lr`, `--momentum`,
                `--w_mask_weight_decay`, cosine to `--eta_min`); both anneal per
                epoch. An evaluation is a candidate for `weights_best.npz`
                only while density - target < 0.01 (AutoReP's test), and the
                best is the one with the highest validation accuracy (test
                accuracy with `--valid_size=0`, as AutoReP selects on the
                test set).
  prune_iter_1  fine-tuning, `--epochs` (0: none), from the best mask-phase
                weights (the final ones when no evaluation came within 0.01 of
                the target; `metadata.json` says which): alpha frozen,
                `--mask_dropout` (spgrad, poly and autopoly only, as in
                AutoReP), the flags' optimizer and schedule
                (`--optimizer=sgd --learning_rate ... --lr_schedule=cosine`),
                distillation from `--teacher_dir`.

Every evaluation adds `relu_count` and `relu_density` to train.csv, the live
ReLUs of every site to `relu_sites.csv`, and natural and adversarial accuracy
under `--attack` (so the robustness of ReLU-reduced networks comes with
every number). `metadata.json` records the target, the final density and the
per-site counts.
"""

import os

import numpy as np
from absl import logging
from keras import ops

from robust_sparse.experiments import build
from robust_sparse.experiments.registry import EXPERIMENTS, MaskPhaseExperiment, Measurement
from robust_sparse.core import files
from robust_sparse.core.run_folder import finished_run
from robust_sparse.nn import relu_masks as relu_lib
from robust_sparse.nn.weights import model_weights
from robust_sparse.training.optimizers import AdamL2, TorchSGD
from robust_sparse.training.schedules import make_schedule
from robust_sparse.training.steps import OptimizerGroup, penalized

# AutoReP saves a mask-phase checkpoint only while sparsity - (1 - density) < 0.01.
BEST_DENSITY_MARGIN = 0.01


class _TorchAdamL2(AdamL2):
  """`AdamL2` with `torch.optim.Adam`'s epsilon (1e-8, added after the bias correction).

  Keras adds epsilon to sqrt(v) before the bias correction, which at step t is
  a PyTorch eps of epsilon / sqrt(1 - beta_2^t) (3e-6 at t = 1 for Keras' 1e-7).
  AutoReP's mask logits get gradients as small as lamda / (ReLU count) times
  softplus(alpha) (4e-5 on resnet18) or smaller, where that changes Adam's
  steps by percents; here the update is PyTorch's:
  w -= lr / (1 - beta_1^t) * m / (sqrt(v / (1 - beta_2^t)) + eps).
  """

  def __init__(self, learning_rate, *, weight_decay=0.0, epsilon=1e-8, **kwargs):
    super().__init__(learning_rate, weight_decay=weight_decay, epsilon=epsilon, **kwargs)

  def update_step(self, gradient, variable, learning_rate):
    if self.weight_decay and self._use_weight_decay(variable):
      gradient = ops.add(ops.cast(gradient, variable.dtype),
                         ops.multiply(ops.cast(self.weight_decay, variable.dtype), variable))
    lr = ops.cast(learning_rate, variable.dtype)
    gradient = ops.cast(gradient, variable.dtype)
    step = ops.cast(self.iterations + 1, variable.dtype)
    correction_1 = 1 - ops.power(ops.cast(self.beta_1, variable.dtype), step)
    correction_2 = 1 - ops.power(ops.cast(self.beta_2, variable.dtype), step)
    m = self._momentums[self._get_variable_index(variable)]
    v = self._velocities[self._get_variable_index(variable)]
    self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
    self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
    denominator = ops.add(ops.sqrt(ops.divide(v, correction_2)), self.epsilon)
    self.assign_sub(variable, ops.divide(ops.multiply(m, lr / correction_1), denominator))


def _write_counts(path, counts: relu_lib.ReLUCounts, model):
  rows = [{"layer": name, "site": getattr(model.get_layer(name), "site", None) or "",
           "relus": count} for name, count in counts.per_site.items()]
  rows.append({"layer": "total", "site": "", "relus": counts.total})
  files.write_csv(path, ("layer", "site", "relus"), rows)


@EXPERIMENTS.register("relu_count")
class ReLUCount(Measurement):
  """Counts the ReLU elements of `--model` on `--dataset`'s images; trains nothing."""

  def after_run(self, runner):
    model = runner.build(0, 0)
    counts = relu_lib.relu_counts(model)
    _write_counts(os.path.join(runner.run_dir, "relu_counts.csv"), counts, model)
    return f"relu count: {counts.total}"


@EXPERIMENTS.register("relu_prune")
class ReLUPrune(MaskPhaseExperiment):
  """AutoReP's two phases on a pretrained network (see the module docstring)."""
  prunes = False
  columns = ("relu_count", "relu_density")

  def __init__(self, hparams):
    super().__init__(hparams)
    self._pretrained = None
    self._total = None
    self.target = None

  # ---- checks -------------------------------------------------------------------
  def check(self, dataset, num_train):
    super().check(dataset, num_train)
    hp = self.hparams
    if (hp.relu_sparsity is None) == (hp.relu_count is None):
      raise ValueError("relu_prune needs exactly one of --relu_sparsity and --relu_count")
    if hp.relu_sparsity is not None and not 0.0 <= hp.relu_sparsity < 1.0:
      raise ValueError(f"--relu_sparsity must be in [0, 1), got {hp.relu_sparsity}")
    if not hp.pretrained_run:
      raise ValueError("relu_prune needs --pretrained_run=DIR, a finished baseline run")
    if hp.mask_dropout > 0 and not relu_lib.has_mask_dropout(hp.relu_replacement):
      logging.warning("--mask_dropout=%g has no effect with --relu_replacement=%s (AutoReP "
                      "drops out to relu only in its spgrad, poly and autopoly modules)",
                      hp.mask_dropout, hp.relu_replacement)
    _, self._pretrained = finished_run(
        hp.pretrained_run, "--pretrained_run", matches=hp,
        fields=("model", "dataset", "resolution", "normalize", "activation", "dropout"))
    base = build.model(hp, dataset.input_shape, dataset.num_classes)
    self._total = relu_lib.relu_counts(base).total
    if hp.relu_count is not None:
      budget = int(round(hp.relu_count * 1000))
      if not 1 <= budget <= self._total:
        raise ValueError(f"--relu_count={hp.relu_count:g} (thousands) is {budget} ReLUs; "
                         f"{hp.model} has {self._total}")
      self.target = relu_lib.target_density(self._total, relu_count=budget)
    else:
      self.target = relu_lib.target_density(self._total, relu_sparsity=hp.relu_sparsity)
    # Replacing fails early here (a non-relu activation, an autopoly without sites).
    relu_lib.replace_activations(base, **self._masked_relu_kwargs(0, 0))

  def phase(self, level):
    return "mask" if level == 0 else "finetune"

  # ---- the model -----------------------------------------------------------------
  def _masked_relu_kwargs(self, trial, level):
    hp = self.hparams
    return dict(replacement=hp.relu_replacement, relu_forward=hp.relu_forward,
                scale_x2=hp.scale_x2, scale_x=hp.scale_x,
                hysteresis_threshold=hp.hysteresis_threshold,
                mask_dropout=hp.mask_dropout if level == 1 else 0.0,
                seed=hp.seed * 1000 + trial, frozen=level == 1)

  def transform_model(self, model, trial, level):
    return relu_lib.replace_activations(model, **self._masked_relu_kwargs(trial, level))

  def start(self, level, history, fresh):
    if level == 0:
      # The baseline's weights; the mask logits (and trainable polynomials) are new.
      extra = sorted(set(self._pretrained) - set(fresh))
      if extra:
        raise ValueError(f"--pretrained_run={self.hparams.pretrained_run} has variables the "
                         f"model lacks: {', '.join(extra[:3])}")
      new = {path for path in fresh if path not in self._pretrained}
      sites = {path.split("/")[0] for path in fresh if path.endswith("/alpha")}
      stray = sorted(p for p in new if p.split("/")[0] not in sites)
      if stray:
        raise ValueError(f"--pretrained_run={self.hparams.pretrained_run} lacks "
                         f"{', '.join(stray[:3])}")
      return {**fresh, **self._pretrained}, 0
    if os.path.exists(history.path(0, "weights_best.npz")):
      return history.weights(0, "weights_best.npz"), 0
    return history.final_weights(0), 0

  # ---- training -------------------------------------------------------------------
  def mask_phase_groups(self, model, num_train, defaults):
    hp = self.hparams
    total = self.total_iterations(0, num_train)
    steps = hp.steps_per_epoch(num_train)

    def cosine(base, eta_min):
      return make_schedule("cosine", base, total_iterations=total, steps_per_epoch=steps,
                           per="epoch", eta_min=eta_min)

    is_alpha = relu_lib.alpha_predicate(model)
    alpha_pass = penalized(
        defaults.loss_grad_fn(distill=False),
        lambda trainable: relu_lib.density_penalty(model, self.target, hp.lamda,
                                                   trainable_values=trainable),
        name="density_penalty")
    return [
        OptimizerGroup("alpha", _TorchAdamL2(hp.alpha_lr, weight_decay=hp.alpha_weight_decay,
                                             beta_1=0.5, beta_2=0.999),
                       cosine(hp.alpha_lr, 0.0), predicate=is_alpha,
                       loss_grad_fn=alpha_pass),
        OptimizerGroup("weights", TorchSGD(hp.w_mask_lr, momentum=hp.momentum,
                                           weight_decay=hp.w_mask_weight_decay),
                       cosine(hp.w_mask_lr, hp.eta_min),
                       predicate=lambda variable: not is_alpha(variable)),
    ]

  # ---- measurements -----------------------------------------------------------------
  def measure(self, level, model):
    live = relu_lib.live_relu_counts(model)
    return {"relu_count": live.total, "relu_density": live.total / self._total}

  def on_evaluate(self, level, model, logs, directory):
    live = relu_lib.live_relu_counts(model)
    total = relu_lib.relu_counts(model).per_site
    iteration = logs["train"][-1]["iteration"]
    logs.setdefault("relu_sites", []).extend(
        {"iteration": iteration, "layer": name, "relus": total[name], "live": count}
        for name, count in live.per_site.items())
    files.write_csv(os.path.join(directory, "relu_sites.csv"),
                    ("iteration", "layer", "relus", "live"), logs["relu_sites"])
    if level == 0 and self._is_best(logs):
      files.save_arrays(os.path.join(directory, "weights_best.npz"), model_weights(model))

  def _selection_accuracy(self, logs, index):
    acc = logs["valid"][index]["acc"]
    return logs["test"][index]["acc"] if np.isnan(acc) else acc

  def _candidates(self, logs):
    """Indices (into logs["train"]) of evaluations within the margin of the target."""
    return [i for i, row in enumerate(logs["train"])
            if row["relu_density"] - self.target < BEST_DENSITY_MARGIN]

  def _best_index(self, logs):
    """The first evaluation with the highest selection accuracy among the candidates."""
    # The valid / test logs have one more row (the evaluation at the start).
    best, best_acc = None, -np.inf
    for i in self._candidates(logs):
      acc = self._selection_accuracy(logs, i + 1)
      if acc > best_acc:
        best, best_acc = i, acc
    return best

  def _is_best(self, logs):
    return self._best_index(logs) == len(logs["train"]) - 1

  def metadata(self, level, model, directory, logs):
    live = relu_lib.live_relu_counts(model)
    total = relu_lib.relu_counts(model)
    values = {
        "relu_total": total.total, "relu_count": live.total,
        "relu_density": live.total / total.total, "target_density": self.target,
        "relu_replacement": self.hparams.relu_replacement,
        "relu_sites": {name: {"relus": total.per_site[name], "live": live.per_site[name]}
                       for name in total.per_site},
    }
    if level == 0:
      best = self._best_index(logs)
      values["best"] = (None if best is None else
                        {"iteration": int(logs["train"][best]["iteration"]),
                         "relu_density": float(logs["train"][best]["relu_density"]),
                         "acc": float(self._selection_accuracy(logs, best + 1))})
    else:
      best = os.path.exists(os.path.join(os.path.dirname(directory), "prune_iter_0",
                                         "weights_best.npz"))
      values["started_from"] = ("best mask-phase weights" if best else
                                "final mask-phase weights (no evaluation came within "
                                f"{BEST_DENSITY_MARGIN} of the target density)")
    return values

