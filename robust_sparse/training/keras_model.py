"""The Keras front-end: `RobustModel`, whose `train_step` is the toolkit's step.

A researcher's own `model.fit` gets the same training as the runner
(adversarial training, distillation, optimizer groups with schedules,
clipping, loss scaling, augmentation, masks) and any Keras callback:

  robust = RobustModel(build_model("lenet5", (28, 28, 1), 10),
                       attack=make_attack(AttackConfig("pgd")), seed=0)
  robust.compile(optimizer=make_optimizer("sgd", 0.1, momentum=0.9))
  robust.fit(train_dataset, epochs=3, validation_data=valid_dataset,
             callbacks=[keras.callbacks.CSVLogger("log.csv")])

Randomness (attack starts, augmentation) is a stateless function of
(`seed`, step iteration), as in the runner, so the same batches give the same
weights through `fit` and through the runner.
"""

from typing import Callable, Optional, Sequence

import keras
import tensorflow as tf

from robust_sparse.core.streams import Stream
from robust_sparse.measure.saturation import SaturationModel
from robust_sparse.training import steps as steps_lib
from robust_sparse.training.compilation import supports_xla, xla_pays_off
from robust_sparse.training.steps import METRICS, OptimizerGroup


class RobustModel(keras.Model):
  """Wraps a (functional) classifier so that `fit` trains it with a toolkit step.

  Args:
    network: the model to train; it outputs logits.
    num_classes: defaults to the network's output width.
    label_smoothing: of the training loss.
    attack: `attack(model, x, y, seed)`: adversarial training with `adv_mix`,
      and robust accuracy in `evaluate`.
    adv_loss, trades_beta, mart_beta, budget: the adversarial objective
      ("pgd_ce" on `attack`'s examples, or "trades" / "mart" with their own
      inner maximisation from `budget`; see `steps.standard_loss_grad_fn`).
    teacher, distill_temperature: knowledge distillation.
    augment: `augment(x, y, seed) -> (x, y)` for training batches (see
      `data.augment.build`).
    grad_clip_norm: global-norm gradient clipping.
    loss_scale: a `steps.LossScale` for mixed_float16 training.
    sharpness: `LossGradFn -> LossGradFn`, e.g. `lambda inner:
      sharpness.sharpness_aware(inner, network, rho=0.05)` for SAM.
    seed: the run seed of every stateless random choice.
    measurement: layer measurements fed by the step's own passes, as the
      runner's engine feeds them: an object with `tap_model` and
      `update(outputs, split)`, e.g. `measurements.Measurements(network,
      ["saturation", "activation_sparsity"])`; training batches feed "train"
      (natural examples only), `evaluate` / validation batches "eval". Report
      it with `measurement_callback.MeasurementCallback(measurement)`.

  Raises:
    ValueError: for a network wrapped by `SaturationCallback.wrap` (pass
      `measurement=` instead); an invalid adversarial objective (see
      `steps.standard_loss_grad_fn`).
  """

  def __init__(self, network: keras.Model, *, num_classes: Optional[int] = None,
               label_smoothing: float = 0.0, attack: Optional[Callable] = None,
               adv_mix: float = 0.5, adv_loss: str = "pgd_ce", trades_beta: float = 6.0,
               mart_beta: float = 6.0, budget=None, teacher: Optional[keras.Model] = None,
               distill_temperature: float = 4.0, augment: Optional[Callable] = None,
               grad_clip_norm: Optional[float] = None,
               loss_scale: Optional[steps_lib.LossScale] = None,
               sharpness: Optional[Callable] = None, seed: int = 0, measurement=None,
               **kwargs):
    if isinstance(network, SaturationModel):
      raise ValueError(f"RobustModel cannot train {network.name!r}, a `SaturationCallback.wrap` "
                       "model; pass the network itself with `measurement=measurements."
                       "Measurements(network, ['saturation'])` and a MeasurementCallback")
    super().__init__(**kwargs)
    self.measurement = measurement
    taps = None if measurement is None else measurement.tap_model
    self.network = network
    self.num_classes = num_classes or int(network.output.shape[-1])
    self.attack = attack
    self.loss_grad_fn = steps_lib.standard_loss_grad_fn(
        network, num_classes=self.num_classes, label_smoothing=label_smoothing,
        attack=attack, adv_mix=adv_mix, adv_loss=adv_loss, trades_beta=trades_beta,
        mart_beta=mart_beta, budget=budget, teacher=teacher,
        distill_temperature=distill_temperature, loss_scale=loss_scale,
        sharpness=sharpness, taps=taps)
    self.augment = augment
    self.grad_clip_norm = grad_clip_norm
    self.loss_scale = loss_scale
    self.top5 = self.num_classes > 10
    self.seed = tf.Variable(seed, dtype=tf.int64, trainable=False, name="seed")
    self.step_iteration = tf.Variable(0, dtype=tf.int64, trainable=False,
                                      name="step_iteration")
    self._names = [m for m in METRICS if (m != "top5" or self.top5)
                   and (not m.startswith("adv") or attack is not None)]
    self._trackers = {m: keras.metrics.Mean(name=m) for m in self._names}
    self._step = None

  def call(self, inputs, training=False):
    return self.network(inputs, training=training)

  def compile(self, optimizer="adam", *, groups: Optional[Sequence[OptimizerGroup]] = None,
              schedule: Optional[Callable] = None, **kwargs):
    """Compiles with one optimizer (and optional `schedule(iteration)`) or with groups.

    Args:
      optimizer: the optimizer of every trainable variable (ignored with groups).
      groups: optimizer groups (variables by predicate, each with its own
        optimizer and schedule), e.g. weights with SGD and mask logits with Adam.
      schedule: learning rate as a function of the step iteration.
      **kwargs: as `keras.Model.compile` (`steps_per_execution`, ...); `loss` and
        `metrics` are not used: the step computes them. `jit_compile` defaults
        to the engine's choice (XLA when every layer supports it and it is
        faster, `compilation.xla_pays_off`), because
        stateless random draws (PGD's random start) differ between XLA and
        plain TensorFlow, and `fit` should train exactly as the runner does.
        The batch size is not known here, so it counts as large: on a CPU the
        runner may also train a conv net without max pooling with XLA at a
        batch of at most 8 (natural training), where it times both and keeps
        the faster (its run folder's `compile.json` says which); pass
        `jit_compile=True` to train such a run as the runner does.
    """
    kwargs.setdefault("jit_compile", supports_xla(self.network)
                      and xla_pays_off(self.network)
                      and getattr(self.augment, "supports_jit", True))
    if groups is None:
      optimizer = keras.optimizers.get(optimizer)
      groups = [OptimizerGroup("weights", optimizer, schedule)]
    super().compile(optimizer=groups[0].optimizer, **kwargs)
    self.groups = list(groups)
    self._step = steps_lib.make_train_step(
        self.network, self.loss_grad_fn, self.groups, grad_clip_norm=self.grad_clip_norm,
        loss_scale=self.loss_scale, augment=self.augment, top5=self.top5,
        on_taps=None if self.measurement is None else (
            lambda outputs: self.measurement.update(outputs, "train")))

  @property
  def metrics(self):
    return list(self._trackers.values())

  def train_step(self, data):
    x, y = data[0], tf.cast(data[1], tf.int32)
    stats = self._step(x, y, self.seed, self.step_iteration)
    self.step_iteration.assign_add(1)
    for name in self._names:
      self._trackers[name].update_state(stats[name])
    return {name: tracker.result() for name, tracker in self._trackers.items()}

  def test_step(self, data):
    x, y = data[0], tf.cast(data[1], tf.int32)
    sums = steps_lib.evaluation_sums(
        self.network, self.attack, x, y,
        steps_lib.stream_seed(self.seed, self.step_iteration, Stream.VALID_ATTACK), self.top5,
        taps=None if self.measurement is None else self.measurement.tap_model,
        on_taps=None if self.measurement is None else (
            lambda outputs: self.measurement.update(outputs, "eval")))
    count = tf.cast(tf.shape(y)[0], tf.float32)
    values = {name: value / count for name, value in sums.items()}
    values["loss"] = values["nat_loss"]
    for name in self._names:
      self._trackers[name].update_state(values[name], sample_weight=count)
    return {name: tracker.result() for name, tracker in self._trackers.items()}

  def predict_step(self, data):
    x = data[0] if isinstance(data, (tuple, list)) else data
    return self.network(x, training=False)
