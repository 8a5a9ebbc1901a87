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
  * on a CPU-only machine, a model with max pooling: "graph". XLA's CPU
    backend runs pooling gradients as select-and-scatter: at batch 8 a
    ResNet-18 with a max-pool stem trained at 1.30 steps/s compiled against
    5.31-5.91 as a graph, a VGG-16-BN at 1.06-1.09 against 2.47-3.02;
  * on a CPU-only machine, a model with convolutions: "graph", except for
    natural training at a per-replica batch of at most `XLA_CONV_BATCH` (8),
    where "xla_step" and "graph" are both timed on a few of the run's own
    steps and the faster is kept (`timed_candidates`). XLA runs convolutions
    on Eigen, not oneDNN: at batch 8 XLA's fusions win or tie on one VM (an
    XLA call per step against a graph, steps/s, two runs: ResNet-18 3.44 /
    3.11 and 3.10 / 3.11, WideResNet-16-4 5.84 / 5.44 and 5.03 / 3.63,
    conv-bn 291 / 237 and 321 / 331, ViT-Tiny 26.4 / 22.3 and 21.1 / 18.1)
    and lose on another of the same kind (Keras' fit on ResNet-18, XLA on
    and off: 4.81 / 5.37); at 16 they tie (ResNet-18 1.68 / 1.67, conv-bn
    132 / 145) and at 32 oneDNN wins (ResNet-18 0.36 / 0.55, conv-bn 27 / 29). An
    attack's loop inside the step is slower compiled at any batch (PGD-10 at
    batch 8: conv-bn 11.5 / 29.4, ResNet-18 0.20 / 0.38), and so is one
    XLA loop over a chunk of steps (conv-bn, batch 32: 2.3 steps/s against
    27 as a call per step; a ResNet-18's loop had not compiled after 17
    minutes). Evaluation (batches of 1000, with its attacks) is a graph.
    No GPU has measured the loop, so conv nets there keep the per-step XLA
    call that Keras' own `jit_compile` uses;
  * else (dense layers, attention, normalisation), natural training on
    in-memory data: "xla_loop" (dense-300-100, batch 60: 406 steps/s against
    370 as a call per step and 200 as a graph); adversarial training or data
    read from files: "xla_step" (the attack's loop nested in the XLA loop ran
    5-11 % slower).
"""

from typing import Callable, Optional, Tuple

import tensorflow as tf

MODES = ("auto", "xla_loop", "xla_step", "graph")


def supports_xla(model) -> bool:
  """False when any layer says it has no XLA kernel (e.g. the compiled JSReLU op)."""
  return all(getattr(layer, "supports_jit", True)
             for layer in model._flatten_layers(include_self=True))


_CONVOLUTION = ("Conv", "Pool")  # Layer class names (Keras' and the zoo's own).
_MAX_POOLING = "MaxPool"
# The largest per-replica batch at which XLA's convolutions beat oneDNN's on a CPU
# (natural training; see the module docstring).
XLA_CONV_BATCH = 8


def on_gpu() -> bool:
  return bool(tf.config.list_logical_devices("GPU"))


def _class_names(model):
  return [type(layer).__name__ for layer in model._flatten_layers(include_self=True)]


def has_convolutions(model) -> bool:
  """Whether any layer is a convolution or a pooling (class name with "Conv" or "Pool")."""
  return any(part in name for name in _class_names(model) for part in _CONVOLUTION)


def has_max_pooling(model) -> bool:
  """Whether any layer is a max pooling (class name with "MaxPool", Keras' or the zoo's)."""
  return any(_MAX_POOLING in name for name in _class_names(model))


def xla_pays_off(model, batch_size: Optional[int] = None, attack_loop: bool = False) -> bool:
  """Whether XLA makes `model`'s steps faster on this machine (the module docstring's rules).

  True on a GPU, and for models of dense layers, attention and normalisation.
  On a CPU-only machine, for a model with a convolution or pooling layer (Keras'
  and the masked ones), True only for natural training (no `attack_loop`) at a
  per-replica `batch_size` of at most `XLA_CONV_BATCH` without max pooling;
  an unknown batch size (None) counts as large.
  """
  if on_gpu() or not has_convolutions(model):
    return True
  if attack_loop or has_max_pooling(model) or batch_size is None:
    return False
  return batch_size <= XLA_CONV_BATCH


def choose(model, mode: str = "auto", *, augment: Optional[Callable] = None,
           in_memory: bool = True, adv_train: bool = False,
           batch_size: Optional[int] = None) -> str:
  """The way to compile `model`'s training: "xla_loop", "xla_step" or "graph".

  Args:
    model: the Keras model trained.
    mode: one of `MODES`; "auto" chooses by the rules of the module docstring.
    augment: the training augmentation (its `supports_jit` attribute, default True).
    in_memory: training images are in memory (not decoded from files).
    adv_train: adversarial training (a nested attack loop in each step).
    batch_size: the per-replica training batch size (None: unknown, counted as large).

  Raises:
    ValueError: an unknown mode, XLA asked for a model or augmentation that
      has no XLA kernel, or "xla_loop" for data read from files.
  """
  if mode not in MODES:
    raise ValueError(f"--compile={mode} is not one of {', '.join(MODES)}")
  xla_possible = supports_xla(model) and getattr(augment, "supports_jit", True)
  if mode == "auto":
    if not (xla_possible and xla_pays_off(model, batch_size, attack_loop=adv_train)):
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


def timed_candidates(model, mode: str, chosen: str) -> Tuple[str, ...]:
  """The modes that "auto" times on this machine before choosing, or () to keep `chosen`.

  On a CPU-only machine, the one place where `choose` compiles a model with
  convolutions ("xla_step": natural training at a per-replica batch of at most
  `XLA_CONV_BATCH`, no max pooling) is where the rules' measurements tie and
  swap sides from one machine to another (batch 8, steps/s, an XLA call per
  step against a graph: ResNet-18 3.44 / 3.11 on one 2-core VM and Keras' fit
  4.81 / 5.37 on another): there both are timed on a few of the run's own
  steps (`Engine.settle_compile`). Elsewhere one side wins by far and the rule
  stands.

  Args:
    model: the Keras model trained.
    mode: the mode asked for (`--compile`); only "auto" is ever timed.
    chosen: what `choose` returned for it.
  """
  if mode != "auto" or chosen != "xla_step" or on_gpu() or not has_convolutions(model):
    return ()
  return ("xla_step", "graph")


def evaluation_uses_xla(model, mode: str, chosen: str, batch_size: int) -> bool:
  """Whether evaluation (its attacks included) is XLA-compiled.

  Args:
    model: the Keras model evaluated.
    mode: the mode asked for (`--compile`); a named mode holds for evaluation too.
    chosen: the training's mode, as `choose` returned it.
    batch_size: the per-replica evaluation batch size.
  """
  if chosen == "graph":
    return False
  if mode != "auto":
    return True
  return xla_pays_off(model, batch_size, attack_loop=True)
