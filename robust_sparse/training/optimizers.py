"""Optimizers with the update rules of the seeds' PyTorch optimizers.

The seeds train with `torch.optim.SGD`, `Adam` and `AdamW`; the lottery
experiments (seed 004, TF1) with the TF/Keras Adam. Keras' own optimizers do
not all follow PyTorch:

- `keras.optimizers.SGD` keeps `m = momentum * m - lr * g` (the learning rate
  inside the buffer), so it drifts from PyTorch as soon as a schedule changes
  the learning rate, and its `weight_decay` is decoupled (`w -= lr * wd * w`)
  where PyTorch's SGD and Adam add `wd * w` to the gradient. `TorchSGD` below
  is PyTorch's rule.
- `keras.optimizers.Adam` is kept as is for the lottery experiments; `AdamL2`
  adds PyTorch Adam's coupled weight decay to it.
- `keras.optimizers.AdamW` already decays as `torch.optim.AdamW` does (`w -=
  lr * wd * w` with the current learning rate, before the moment update), so
  "adamw" is Keras' class.

One difference from PyTorch remains in the two Adam variants: Keras adds
epsilon to sqrt(v) before the bias correction ("epsilon hat" in Kingma and Ba),
PyTorch after it, so PyTorch's `eps` equals Keras' `epsilon / sqrt(1 -
beta_2**t)`. They differ only while sqrt(v) is as small as epsilon; kept so
that "adam" stays bit-identical to the Keras Adam of the lottery experiments.

Every optimizer is built with a float learning rate, which Keras stores in a
variable: the training engine drives schedules by assigning
`optimizer.learning_rate` before each step, inside its compiled function.
"""

from typing import Callable, Optional

import keras
from keras import ops

from robust_sparse.core.registry import Registry
from robust_sparse.training.sharpness import PERTURBATIONS

OPTIMIZERS: Registry[Callable[..., keras.optimizers.Optimizer]] = Registry("optimizer")

# Keras' default, which the lottery experiments' numbers depend on.
KERAS_ADAM_EPSILON = 1e-7


@keras.saving.register_keras_serializable(package="robust_sparse")
class TorchSGD(keras.optimizers.Optimizer):
  """Stochastic gradient descent with `torch.optim.SGD`'s update (dampening 0).

  Per variable `w` with gradient `grad`:

      g = grad + weight_decay * w              # coupled L2 decay
      buf = momentum * buf + g                 # buf starts at 0, so buf_1 = g
      d = g + momentum * buf if nesterov else buf   (d = g without momentum)
      w = w - learning_rate * d

  The buffer holds gradients, not steps, so a changed learning rate applies to
  the whole step at once, as in PyTorch. Variables excluded with
  `exclude_from_weight_decay` get no decay.
  """

  def __init__(self, learning_rate: float = 0.01, momentum: float = 0.0,
               nesterov: bool = False, weight_decay: float = 0.0,
               name: str = "torch_sgd", **kwargs):
    """Args:
      learning_rate: the initial learning rate (a float, kept in a variable).
      momentum: the momentum factor, >= 0.
      nesterov: use Nesterov momentum; needs momentum > 0.
      weight_decay: the coupled L2 factor, >= 0.
      name: the optimizer's name.
      **kwargs: other `keras.optimizers.Optimizer` arguments (clipnorm, ...).

    Raises:
      ValueError: for a negative momentum or weight decay, or Nesterov
        without momentum.
    """
    momentum = float(momentum)
    weight_decay = float(weight_decay or 0.0)
    if momentum < 0:
      raise ValueError(f"`momentum` must be >= 0, got {momentum}")
    if weight_decay < 0:
      raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}")
    if nesterov and momentum <= 0:
      raise ValueError("`nesterov=True` needs `momentum` > 0")
    super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name,
                     **kwargs)
    self.momentum = momentum
    self.nesterov = bool(nesterov)

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    self.momentums = []
    if self.momentum > 0:
      self.momentums = self.add_optimizer_variables(variables, "momentum")

  def _apply_weight_decay(self, variables):
    # Keras would decay the weights directly (decoupled); here the decay is
    # part of the gradient, in update_step.
    return

  def update_step(self, gradient, variable, learning_rate):
    learning_rate = ops.cast(learning_rate, variable.dtype)
    gradient = ops.cast(gradient, variable.dtype)
    if self.weight_decay and self._use_weight_decay(variable):
      gradient = ops.add(gradient,
                         ops.multiply(ops.cast(self.weight_decay, variable.dtype), variable))
    direction = gradient
    if self.momentum > 0:
      momentum = ops.cast(self.momentum, variable.dtype)
      buffer = self.momentums[self._get_variable_index(variable)]
      new_buffer = ops.add(ops.multiply(momentum, buffer), gradient)
      self.assign(buffer, new_buffer)
      if self.nesterov:
        direction = ops.add(gradient, ops.multiply(momentum, new_buffer))
      else:
        direction = new_buffer
    self.assign_sub(variable, ops.multiply(learning_rate, direction))

  def get_config(self):
    config = super().get_config()
    config.update({"momentum": self.momentum, "nesterov": self.nesterov})
    return config


@keras.saving.register_keras_serializable(package="robust_sparse")
class AdamL2(keras.optimizers.Adam):
  """Keras Adam with `torch.optim.Adam`'s coupled weight decay.

  The gradient becomes `grad + weight_decay * w` before the moments are
  updated; the rest is `keras.optimizers.Adam` (see the module docstring for
  its epsilon). Variables excluded with `exclude_from_weight_decay` get no
  decay.
  """

  def __init__(self, learning_rate: float = 0.001, weight_decay: float = 0.0,
               name: str = "adam_l2", **kwargs):
    """Args:
      learning_rate: the initial learning rate (a float, kept in a variable).
      weight_decay: the coupled L2 factor, >= 0.
      name: the optimizer's name.
      **kwargs: other `keras.optimizers.Adam` arguments (beta_1, epsilon, ...).

    Raises:
      ValueError: for a negative weight decay.
    """
    weight_decay = float(weight_decay or 0.0)
    if weight_decay < 0:
      raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}")
    super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name,
                     **kwargs)

  def _apply_weight_decay(self, variables):
    # Coupled: applied to the gradient in update_step instead.
    return

  def update_step(self, gradient, variable, learning_rate):
    if self.weight_decay and self._use_weight_decay(variable):
      gradient = ops.add(ops.cast(gradient, variable.dtype),
                         ops.multiply(ops.cast(self.weight_decay, variable.dtype), variable))
    super().update_step(gradient, variable, learning_rate)


@OPTIMIZERS.register("sgd")
def _sgd(learning_rate, *, momentum, nesterov, weight_decay, beta_1, beta_2, epsilon):
  del beta_1, beta_2, epsilon  # Adam only.
  return TorchSGD(learning_rate, momentum=momentum, nesterov=nesterov,
                  weight_decay=weight_decay)


def _adam_kwargs(beta_1, beta_2, epsilon):
  return {"beta_1": beta_1, "beta_2": beta_2,
          "epsilon": KERAS_ADAM_EPSILON if epsilon is None else epsilon}


@OPTIMIZERS.register("adam")
def _adam(learning_rate, *, momentum, nesterov, weight_decay, beta_1, beta_2, epsilon):
  del momentum, nesterov  # As the seeds' build_base_optimizer: SGD only.
  if weight_decay == 0:
    # Exactly the lottery experiments' optimizer.
    return keras.optimizers.Adam(learning_rate, **_adam_kwargs(beta_1, beta_2, epsilon))
  return AdamL2(learning_rate, weight_decay=weight_decay,
                **_adam_kwargs(beta_1, beta_2, epsilon))


@OPTIMIZERS.register("adamw")
def _adamw(learning_rate, *, momentum, nesterov, weight_decay, beta_1, beta_2, epsilon):
  del momentum, nesterov
  return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay,
                                **_adam_kwargs(beta_1, beta_2, epsilon))


def split_optimizer(name: str):
  """`"sam-sgd"` -> `("sam", "sgd")`; `"sgd"` -> `(None, "sgd")`.

  The perturbations (the seed's `<perturbation>-<base>` names) are the SAM
  family's registry, `robust_sparse.training.sharpness.PERTURBATIONS`.

  Raises:
    ValueError: an unknown perturbation or base optimizer, naming `--optimizer`.
  """
  perturbation, _, base = name.rpartition("-")
  perturbations = PERTURBATIONS.names()
  if perturbation and perturbation not in PERTURBATIONS:
    raise ValueError(f"--optimizer={name}: unknown perturbation {perturbation!r}; known: "
                     f"{', '.join(perturbations)}")
  if base not in OPTIMIZERS.names():
    raise ValueError(f"--optimizer={name}: unknown optimizer {base!r}; known: "
                     f"{', '.join(OPTIMIZERS.names())}, each optionally prefixed by "
                     f"{' or '.join(p + '-' for p in perturbations)}")
  return perturbation or None, base


def make_optimizer(name: str, learning_rate: float, *, momentum: float = 0.0,
                   nesterov: bool = False, weight_decay: float = 0.0, beta_1: float = 0.9,
                   beta_2: float = 0.999,
                   epsilon: Optional[float] = None) -> keras.optimizers.Optimizer:
  """Builds the optimizer called `name` with PyTorch's hyper-parameter meanings.

  Args:
    name: "sgd" (`TorchSGD`), "adam" (`keras.optimizers.Adam`, or `AdamL2`
      when weight_decay > 0) or "adamw" (`keras.optimizers.AdamW`).
    learning_rate: the initial learning rate; kept in a variable that the
      engine assigns before each step (`optimizer.learning_rate.assign(lr)`).
    momentum: SGD momentum, >= 0; ignored by the Adam variants (as by the
      SSAM seed's `build_base_optimizer`).
    nesterov: SGD Nesterov momentum; needs momentum > 0. Ignored by Adam.
    weight_decay: >= 0; coupled (added to the gradient) for "sgd" and "adam",
      decoupled for "adamw", as in `torch.optim`.
    beta_1: Adam's first-moment decay, in [0, 1).
    beta_2: Adam's second-moment decay, in [0, 1).
    epsilon: Adam's epsilon, Keras' placement; None means Keras' 1e-7.

  Returns:
    An unbuilt `keras.optimizers.Optimizer`.

  Raises:
    ValueError: for an unknown name (the message lists the known ones) or an
      invalid hyper-parameter; each message names the command-line flag.
  """
  try:
    factory = OPTIMIZERS.get(name)
  except ValueError as error:
    raise ValueError(f"--optimizer: {error}") from None
  learning_rate = float(learning_rate)  # Keras keeps only a float in a variable.
  if learning_rate < 0:
    raise ValueError(f"--learning_rate must be >= 0, got {learning_rate}")
  if momentum < 0:
    raise ValueError(f"--momentum must be >= 0, got {momentum}")
  if weight_decay < 0:
    raise ValueError(f"--weight_decay must be >= 0, got {weight_decay}")
  if name == "sgd" and nesterov and momentum <= 0:
    raise ValueError(f"--nesterov needs --momentum > 0, got --momentum={momentum}")
  for flag, beta in (("beta_1", beta_1), ("beta_2", beta_2)):
    if not 0 <= beta < 1:
      raise ValueError(f"--{flag} must be in [0, 1), got {beta}")
  if epsilon is not None and epsilon < 0:
    raise ValueError(f"--epsilon must be >= 0, got {epsilon}")
  return factory(learning_rate, momentum=float(momentum), nesterov=bool(nesterov),
                 weight_decay=float(weight_decay), beta_1=float(beta_1),
                 beta_2=float(beta_2), epsilon=None if epsilon is None else float(epsilon))
