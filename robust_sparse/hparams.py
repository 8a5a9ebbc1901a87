"""The hyper-parameters of an experiment and the run folder derived from them.

As in OpenLTH, a run's folder is a pure function of its hyper-parameters: a
readable prefix plus a hash of every field that changes results. Fields that
only say where or how much to run (`trials`, the data folder) are left out of
the hash, so adding trials to a finished run extends it.
"""

import dataclasses
import hashlib
import json
import os
from typing import Optional

from attacks.registry import AttackConfig

_ATTACK = AttackConfig()

# Fields that do not change the numbers of a trial.
_NOT_HASHED = ("trials", "data_dir")


@dataclasses.dataclass(frozen=True)
class Hparams:
  """Everything that defines a lottery-ticket experiment (seed defaults)."""
  dataset: str = "digits"
  model: str = "dense-300-100"
  experiment: str = "reinit_orig"
  activation: str = "relu"
  trials: int = 10
  train_iters: int = 50000
  prune_iters: int = 20
  eval_every: int = 500
  batch_size: int = 60
  valid_size: int = 10000
  learning_rate: float = 0.0012
  l1_reg: float = 0.0
  label_smoothing: float = 0.1
  prune_rate: float = 0.2
  prune_rate_output: float = 0.1
  prune_scope: str = "layer"
  rewind_to: str = "init"
  rewind_iteration: int = 0
  attack: str = _ATTACK.name
  attack_impl: str = _ATTACK.impl
  eps: float = _ATTACK.eps
  pgd_step_size: float = _ATTACK.step_size
  pgd_steps: int = _ATTACK.steps
  adv_train: bool = False
  adv_mix: float = 0.5
  seed: int = 0
  data_dir: Optional[str] = None

  def attack_config(self) -> AttackConfig:
    return AttackConfig(name=self.attack, eps=self.eps, step_size=self.pgd_step_size,
                        steps=self.pgd_steps, impl=self.attack_impl)

  def to_dict(self):
    return dataclasses.asdict(self)

  def digest(self) -> str:
    fields = {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]

  def run_dir(self, base_dir: str) -> str:
    """`{base_dir}/{dataset}/{model}/{experiment}/{attack}/{natural|adv}_{hash}`."""
    mode = "adv" if self.adv_train else "natural"
    return os.path.join(base_dir, self.dataset, self.model, self.experiment, self.attack,
                        f"{mode}_{self.digest()}")
