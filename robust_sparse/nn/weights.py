"""A model's weights as a dict by variable path: what run folders save and load.

Every variable, trainable or not (batch-norm statistics, masks), keyed by its
Keras path, so weights saved by one build of a model load into another.
"""

import numpy as np


def model_weights(model):
  """Every model variable (trainable or not) by path."""
  return {v.path: np.asarray(v.numpy()) for v in model.variables}


def assign_weights(model, weights, source="weights"):
  """Assigns `weights` (by path) to every variable of `model`.

  Raises:
    ValueError: a model variable missing from `weights`: never a silent fresh value.
  """
  missing = [v.path for v in model.variables if v.path not in weights]
  if missing:
    raise ValueError(f"{source} has no value for {', '.join(missing[:5])}"
                     f"{' ...' if len(missing) > 5 else ''}")
  for variable in model.variables:
    variable.assign(weights[variable.path])
