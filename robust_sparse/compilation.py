"""How the engine compiles a model's training and evaluation: `--compile`.

Three ways, each a `tf.function`:
  * "xla_loop": a chunk of up to `engine.XLA_CHUNK` training steps is one XLA
    computation (a while loop over the batches' indices, gathered first);
  * "xla_step": each step is one XLA call, from a TensorFlow loop;
  * "graph": each step is one plain TensorFlow graph call (TensorFlow's own,
    oneDNN, kernels; no XLA).

"auto" (`choose`) picks by rules that `benchmarks/bench_models.py` measured
(docs/scaling.md has the tables):
  * layers without an XLA kernel (the compiled JSReLU op) or augmentation
    without one (RandAugment's projective transforms): "graph";
  * on a CPU-only machine, a model with convolutions or pooling: "graph".
    XLA's CPU backend runs convolutions and their gradients on Eigen, not
    oneDNN, and pooling gradients as select-and-scatter: ResNet-18 (CIFAR-10,
    batch 32, 2 cores) trained 10-20x slower compiled, and its compilation
    took minutes;
  * else, natural training on in-memory data: "xla_loop" (dense-300-100,
    batch 60: 0.74 ms per step against 0.97 for a call per step); adversarial
    training or data read from files: "xla_step" (the attack's loop nested in
    the XLA loop ran 5-11 % slower).
On a GPU every model that allows it is compiled.
"""

from typing import Callable, Optional

import tensorflow as tf

MODES = ("auto", "xla_loop", "xla_step", "graph")


def supports_xla(model) -> bool:
  """False when any layer says it has no XLA kernel (e.g. the compiled JSReLU op)."""
  return all(getattr(layer, "supports_jit", True)
             for layer in model._flatten_layers(include_self=True))


_SLOW_ON_XLA_CPU = ("Conv", "Pool")  # Layer class names (Keras' and the zoo's own).


def on_gpu() -> bool:
  return bool(tf.config.list_logical_devices("GPU"))


def xla_pays_off(model) -> bool:
  """Whether XLA makes this model faster on this machine (see the module docstring).

  False on a CPU-only machine for a model with a convolution or pooling layer
  (any class whose name holds "Conv" or "Pool": Keras' and the masked ones);
  True on a GPU, and for models of dense layers, attention and normalisation.
  """
  if on_gpu():
    return True
  return not any(part in type(layer).__name__ for layer in model._flatten_layers(include_self=True)
                 for part in _SLOW_ON_XLA_CPU)


def choose(model, mode: str = "auto", *, augment: Optional[Callable] = None,
           in_memory: bool = True, adv_train: bool = False) -> str:
  """The way to compile `model`'s training: "xla_loop", "xla_step" or "graph".

  Args:
    model: the Keras model trained.
    mode: one of `MODES`; "auto" chooses by the rules of the module docstring.
    augment: the training augmentation (its `supports_jit` attribute, default True).
    in_memory: training images are in memory (not decoded from files).
    adv_train: adversarial training (a nested attack loop in each step).

  Raises:
    ValueError: an unknown mode, XLA asked for a model or augmentation that
      has no XLA kernel, or "xla_loop" for data read from files.
  """
  if mode not in MODES:
    raise ValueError(f"--compile={mode} is not one of {', '.join(MODES)}")
  xla_possible = supports_xla(model) and getattr(augment, "supports_jit", True)
  if mode == "auto":
    if not (xla_possible and xla_pays_off(model)):
      return "graph"
    return "xla_loop" if in_memory and not adv_train else "xla_step"
  if mode != "graph" and not xla_possible:
    raise ValueError(f"--compile={mode}: a layer or the augmentation has no XLA kernel; "
                     "use --compile=graph (or auto)")
  if mode == "xla_loop" and not in_memory:
    raise ValueError("--compile=xla_loop needs the training set in memory; use --compile="
                     "xla_step for data read from files")
  return mode
