"""Reporting the runner's layer measurements in a user's `fit`, `RobustModel` included.

`RobustModel(network, measurement=m)` feeds a `measurements.Measurements` `m`
from the step's own passes (the natural examples of each training batch,
every validation / `evaluate` batch), exactly as the runner's engine does;
`MeasurementCallback(m)` adds its columns (`train-saturation_<layer>`,
`eval-activation_sparsity_<layer>`, ...) to each epoch's logs, so `History`
and `CSVLogger` record them, and starts every epoch from empty accumulators:

  m = Measurements(network, ["saturation", "activation_sparsity"])
  robust = RobustModel(network, attack=make_attack(AttackConfig("pgd")), measurement=m)
  robust.compile(optimizer="adam")
  robust.fit(train, validation_data=valid, epochs=3, callbacks=[MeasurementCallback(m)])

The order matters to Keras only: put the callback before any callback that
reads the logs. For saturation alone `saturation.SaturationCallback(tracker=
m.saturation)` does the same. (`SaturationCallback.wrap` cannot wrap a
`RobustModel`, and a `RobustModel` cannot train a wrapped model: both raise
and say this.)
"""

import keras


class MeasurementCallback(keras.callbacks.Callback):
  """Adds a measurement's `results()` to each epoch's logs and resets it.

  Args:
    measurement: what the trained model feeds, with `results()` and `reset()`
      (a `measurements.Measurements`, a `saturation.SaturationTracker`).
    prefix: prepended to every column name (default: none).
  """

  def __init__(self, measurement, prefix: str = ""):
    super().__init__()
    for method in ("results", "reset"):
      if not callable(getattr(measurement, method, None)):
        raise ValueError(f"MeasurementCallback needs an object with results() and reset(), "
                         f"received {type(measurement).__name__}")
    self.measurement = measurement
    self.prefix = prefix

  def on_train_begin(self, logs=None):
    fed = getattr(self.model, "measurement", None)
    if fed is not None and fed is not self.measurement and getattr(
        fed, "saturation", None) is not self.measurement:
      raise ValueError("MeasurementCallback reports another measurement than the one "
                       "the model feeds (RobustModel(measurement=...)); pass that one")
    self.measurement.reset()

  def on_epoch_begin(self, epoch, logs=None):
    # Drops batches seen between epochs (e.g. other callbacks' predictions).
    self.measurement.reset()

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs.update({self.prefix + key: value
                   for key, value in self.measurement.results().items()})
    self.measurement.reset()
