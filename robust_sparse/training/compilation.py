"""How the engine compiles a model's training and evaluation: `--compile`.

Three ways, each a `tf.function`:
  * "xla_loop": a chunk of up to `engine.XLA_CHUNK` training steps is one XLA
    computation (a while loop over the batches' indices, gathered first);
  * "xla_step": each step is one XLA call, from a TensorFlow loop;
  * "graph": each step is one plain TensorFlow graph call (TensorFlow's own,
    oneDNN, kernels; no XLA).

"auto" (`choose`) picks by rules that `benchmarks/bench_compile.py` measured
(docs/scaling.md has the numbers):
  * layers without an XLA kernel (the compiled JSReLU op) or augmentation
    without one (RandAugment's projective transforms): "graph";
  * a model with convolutions or pooling: "graph" on a CPU-only machine,
    "xla_step" on a GPU. XLA's CPU backend runs convolutions on Eigen, not
    oneDNN, and pooling gradients as select-and-scatter (a ResNet-18 with a
    max-pool stem trained 10x slower compiled); inside one XLA loop it was
    worse still: conv-bn (CIFAR-10, batch 32, 2 cores) ran 2.3 steps/s as
    one loop against 27 as a call per step and 29 as a graph, and a
    ResNet-18's loop had not compiled after 17 minutes. No GPU has measured
    the loop, so conv nets there keep the per-step XLA call that Keras' own
    `jit_compile` uses;
  * else (dense layers, attention, normalisation), natural training on
    in-memory data: "xla_loop" (dense-300-100, batch 60: 406 steps/s against
    370 as a call per step and 200 as a graph); adversarial training or data
    read from files: "xla_step" (the attack's loop nested in the XLA loop ran
    5-11 % slower).
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


def has_convolutions(model) -> bool:
  """Whether any layer is a convolution or a pooling (class name with "Conv" or "Pool")."""
  return any(part in type(layer).__name__ for layer in model._flatten_layers(include_self=True)
             for part in _SLOW_ON_XLA_CPU)


def xla_pays_off(model) -> bool:
  """Whether XLA makes this model faster on this machine (see the module docstring).

  False on a CPU-only machine for a model with a convolution or pooling layer
  (Keras' and the masked ones); True on a GPU, and for models of dense
  layers, attention and normalisation.
  """
  return on_gpu() or not has_convolutions(model)


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
    loop = in_memory and not adv_train and not has_convolutions(model)
    return "xla_loop" if loop else "xla_step"
  if mode != "graph" and not xla_possible:
    raise ValueError(f"--compile={mode}: a layer or the augmentation has no XLA kernel; "
                     "use --compile=graph (or auto)")
  if mode == "xla_loop" and not in_memory:
    raise ValueError("--compile=xla_loop needs the training set in memory; use --compile="
                     "xla_step for data read from files")
  return mode
