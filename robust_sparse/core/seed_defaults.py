"""Each seed's own defaults, for the hyper-parameters a user leaves unset.

`Hparams`' dataclass defaults are the lottery-ticket seed's. An experiment
or optimizer that comes from another seed (AutoReP's `relu_prune`, SSAM's
optimizers, phd-lab's saturation grids, the activation-sparsity seed's
`augmented_flatness`) takes that seed's values for every field the command
line, grid file or notebook did not set. A rule says when it applies (a
predicate on the hyper-parameters), which values it sets, and where they come
from; `apply` resolves them once, before the `Hparams` is built, so
`hparams.json` records the values used and the run folder's hash covers them.

Pure Python: reading or resolving hyper-parameters imports no TensorFlow.
"""

import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class Rule:
  """Seed defaults: `values` for the unset fields whenever `when(hyper-parameters)` holds."""
  seed: str
  source: str
  when: Callable[[Mapping[str, Any]], bool]
  values: Mapping[str, Any]


def _experiment(*names):
  return lambda hp: hp.get("experiment") in names


def _perturbation(*names):
  return lambda hp: str(hp.get("optimizer", "")).split("-")[0] in names


def _all(*predicates):
  return lambda hp: all(p(hp) for p in predicates)


# SSAM's training recipe (Mi-Peng/Systematic-Investigation-of-Sparse-Perturbed-Sharpness-
# Aware-Minimization-Optimizer, README "Training" and configs/defaulf_cfg.py).
# Its train loader drops each epoch's last batch (data/build.py, --drop_last default True).
_SSAM_RECIPE = {"learning_rate": 0.05, "momentum": 0.9, "batch_size": 128,
                "lr_schedule": "cosine", "drop_last": True}

RULES: List[Rule] = [
    Rule("ssam", "Mi-Peng/Systematic-Investigation...: README.md Training (ssamf-sgd), "
         "configs/defaulf_cfg.py", _perturbation("ssamf"),
         {**_SSAM_RECIPE, "weight_decay": 1e-3, "rho": 0.2, "sparsity": 0.5,
          "num_samples": 128, "update_freq": 1}),
    Rule("ssam", "Mi-Peng/Systematic-Investigation...: README.md Training (sam-sgd "
         "--implicit --samconv)", _all(_perturbation("sam"), lambda hp: bool(hp.get("implicit"))),
         {**_SSAM_RECIPE, "weight_decay": 1e-3, "rho": 0.2, "sparsity": 0.5,
          "num_samples": 128, "update_freq": 1}),
    Rule("ssam", "Mi-Peng/Systematic-Investigation...: configs/defaulf_cfg.py (SSAM-D has no "
         "README command; its rho, sparsity, update_freq and drop_rate equal the toolkit's)",
         _perturbation("ssamd"), {**_SSAM_RECIPE, "weight_decay": 5e-4}),
    Rule("AutoReP", "harveyp123/AutoReP: scripts/scripts_relu_prune.sh (--mask_epochs 100, "
         "--act_type ReLU_masked_spgrad, --w_mask_lr 0.02), scripts_relu_prune_finetune.sh "
         "(--w_lr 0.01 --w_weight_decay 1e-3 --epochs 100 --mask_dropout 0.01 --optim cosine), "
         "util_func/config.py (--w_lr_min 1e-5, batch 128, momentum 0.9)",
         _experiment("relu_prune"),
         {"mask_epochs": 100.0, "relu_replacement": "identity_relu_grad", "w_mask_lr": 0.02,
          "eta_min": 1e-5, "epochs": 100.0, "optimizer": "sgd", "learning_rate": 0.01,
          "weight_decay": 1e-3, "lr_schedule": "cosine", "momentum": 0.9,
          "mask_dropout": 0.01, "batch_size": 128}),
    Rule("HYDRA", "inspire-group/hydra: README.md Pruning (--exp-mode prune --epochs 20, "
         "the configs' --lr 0.1) and Fine-tuning (--exp-mode finetune --lr 0.01) commands, "
         "configs/configs.yml (sgd, momentum 0.9, wd 1e-4, cosine, batch 128)",
         _experiment("hydra"),
         {"mask_epochs": 20.0, "score_lr": 0.1, "epochs": 20.0, "optimizer": "sgd",
          "learning_rate": 0.01, "lr_schedule": "cosine", "momentum": 0.9,
          "weight_decay": 1e-4, "batch_size": 128}),
    Rule("activation_sparsity", "cdgyp/sparsity: codes/scripts/imagenet1k/"
         "augmented_flatness_cifar10.sh", _all(_experiment("augmented_flatness"),
                                               lambda hp: hp.get("dataset") == "cifar10"),
         {"batch_size": 128, "label_smoothing": 0.11, "correct_samples_only": True,
          "augment": "flip,mixup,cutmix", "flatness_data": "train"}),
]


# Fields that say the same thing two ways: setting one counts as setting the other.
_SAME_MEANING = {"train_iters": "epochs", "epochs": "train_iters"}


def apply(values: Mapping[str, Any], explicit: Iterable[str],
          fallbacks: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """`values` with each matching rule's values for the fields not in `explicit`.

  Rules are matched on `values` with the explicit settings in place (so
  `--experiment=relu_prune` selects AutoReP's rule), in `RULES` order; a
  later rule does not override a field an earlier one set.

  Args:
    values: every hyper-parameter (field name -> value).
    explicit: the fields the user set (flags present, grid or notebook keys).
    fallbacks: values for fields neither the user nor a rule set (e.g. the data
      set's validation size), applied last.

  Returns:
    A new dict.
  """
  explicit = set(explicit)
  # A length the user gives in iterations is not overridden by a seed's epochs.
  explicit |= {other for field, other in _SAME_MEANING.items() if field in explicit}
  resolved = dict(values)
  set_by_rule = set()
  for rule in RULES:
    if not rule.when(resolved):
      continue
    for field, value in rule.values.items():
      if field not in explicit and field not in set_by_rule:
        resolved[field] = value
        set_by_rule.add(field)
  for field, value in (fallbacks or {}).items():
    if field not in explicit and field not in set_by_rule:
      resolved[field] = value
  return resolved

