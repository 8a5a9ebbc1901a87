"""Activation registry used by every model (`--activation`).

Contract used by `models/`:
  build(spec, name=None) -> keras.layers.Layer  # a fresh activation layer
  validate(spec) -> None                         # ValueError naming the problem
  names() -> list of registered names

PLACEHOLDER: only `relu` for now; issue 4 fills in the J-SquaredReLU family.
"""

import keras

from robust_sparse.registry import Registry

ACTIVATIONS = Registry("activation")


@ACTIVATIONS.register("relu")
def _relu(name=None):
  return keras.layers.ReLU(name=name)


def validate(spec: str) -> None:
  ACTIVATIONS.get(spec)


def build(spec: str, name=None) -> keras.layers.Layer:
  return ACTIVATIONS.get(spec)(name=name)


def names():
  return ACTIVATIONS.names()
