"""Masked Keras layers: drop-in `Dense` / `Conv2D` whose pruned weights are inert.

`MaskedDense` and `MaskedConv2D` take exactly the constructor arguments of
`keras.layers.Dense` and `keras.layers.Conv2D`, report the same `get_config()`,
and keep Keras' attributes: `layer.kernel` is the kernel variable itself
(assignable, differentiable, with the user's `kernel_constraint`), so code
written for the Keras layers works unchanged. On top of that each layer owns a
`mask`, a non-trainable float 0/1 weight of the kernel's shape (as in
tensorflow/model-optimization), saved with the model.

How the mask holds everywhere:
  * `call` computes with `kernel * mask`: a pruned weight contributes nothing to
    the outputs and receives an exactly zero gradient, whatever value the
    variable holds (also for `tf.SparseTensor` inputs, whose kernel gradient
    stays a sparse `tf.IndexedSlices` as in `Dense`). Where the kernel is known
    to be zero wherever masked, `call` skips the multiplication (the fast paths
    below), which computes the same.
  * The kernel variable's constraint is the user's `kernel_constraint` (if any)
    followed by the mask. Keras optimizers apply `variable.constraint` after
    every update, so pruned weights are exact zeros after each step of a user's
    own `model.fit`, even with momentum or decoupled weight decay (AdamW) that
    would otherwise move them. `get_config()` still reports only the user's
    constraint.
  * The kernel regulariser sees the masked kernel, so the regularisation loss
    gives pruned weights no gradient either.
  * LoRA (`lora_rank=r` or `layer.enable_lora(r)`): the effective kernel is
    `(kernel + lora_alpha / r * lora_kernel_a @ lora_kernel_b) * mask`, so the
    low-rank delta cannot revive pruned weights. As in Keras, `layer.kernel` is
    then that effective (merged) tensor, and a save stores it merged (a reload
    computes the same outputs, with zeroed LoRA weights). A constructor
    `lora_alpha` is honoured (Keras 3.15's `Dense.build` drops it).
  * Quantization is refused. Keras' quantized kernels (int8, int4, float8,
    gptq, awq) compute without the mask: the LoRA delta and float8 training
    would revive pruned weights, and the int4 / gptq / awq call paths are Keras
    internals that change between releases. `layer.quantize(...)` raises
    `NotImplementedError`, Keras' contract for a layer that does not quantize,
    so `model.quantize(...)` warns and skips the masked layers (quantizing the
    plain ones, every layer left whole); quantized dtype policies such as
    "int8_from_float32" raise a `ValueError`. To quantize a pruned
    model, `strip_masks(model)` returns the same network with plain Keras layers
    whose kernels are `kernel * mask` (pruned weights exact zeros, which
    symmetric int8 / per-channel int4 quantization keeps at zero); quantize
    that. (Keras 3.15 quantizes no `Conv2D` at all.)
  * A `.keras` file or weights file stores Keras' own entries ("0": kernel,
    "1": bias) plus the mask under the key "mask", as earlier versions did.

Cost, and the fast paths: computing `kernel * mask` in every forward pass and
`grad * mask` in every backward pass are two elementwise passes over each
kernel per step, memory-bound and about 10 % of a small dense network's step on
a CPU. Both are redundant while the invariant "every kernel is already zero
where its mask is" holds, which the constraint restores after every update.
  * The training engine guarantees the invariant itself (`enforce_masks` before
    each compiled chunk) and traces its step inside `masks_hold()`, where
    `call` uses the kernel variable directly. The gradient then also reaches
    pruned weights; an element-wise optimizer's update there is wiped by the
    constraint, so the weights are exactly those of the masked computation, and
    `mask_gradients` masks them where the value matters (global clipping norms,
    loss-scale checks, SAM perturbations).
  * Everywhere else a layer tracks the invariant in a flag variable of its own:
    every write of the kernel or the mask through Keras (`assign`,
    `set_weights`, loading a file or a checkpoint; not the constraint's own,
    masked, write) clears it. A training call (`training=True`) first restores
    the invariant if the flag is clear (`kernel.assign(kernel * mask)`, one
    `tf.cond` per layer, whose masking branch runs once after such writes),
    then computes with the kernel variable. A value written to a pruned weight
    thus stays readable until the next training call zeroes it (the first
    update did before). Inference calls (attacks, evaluation) still multiply. A user's own `fit` thus drops the
    forward pass's multiplication; the gradient's is dropped too where the
    model's compiled optimizer updates each weight from its own gradient alone
    (`_ELEMENTWISE_OPTIMIZERS`, without norm clipping), so that the pruned
    weights' gradients, wiped with their update by the constraint, change
    nothing (a weight that a later mask revives then carries the optimizer
    slots those gradients fed, as under `masks_hold`; compile again for fresh
    ones). Writing the variables' TensorFlow values directly
    (`layer.kernel.value.assign(...)`) bypasses the flag: call
    `enforce_masks(model)` afterwards. Stateless calls (`stateless_call`, the
    step library's), mixed precision, LoRA, sparse inputs and several replicas
    keep the multiplications.
What remains is the constraint: an elementwise pass per kernel after each
update, separate in a plain TensorFlow graph (Keras' default on a CPU), fused
into the update by XLA (`compile(jit_compile=True)`). See
benchmarks/bench_training.py for the measured ratios.
"""

import contextlib
import threading

import keras
import tensorflow as tf
from keras import ops
from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import in_stateless_scope

from robust_sparse.nn import implicit_ops

_QUANTIZATION_REFUSED = (
    "{cls} '{name}' cannot be quantized (received: {received}): Keras' quantized "
    "layers compute without the pruning mask, so pruned weights would come back "
    "into the outputs. To quantize a pruned model, call "
    "`robust_sparse.nn.layers.strip_masks(model)`, which returns the same network with "
    "plain Keras layers whose kernels are `kernel * mask`, and quantize that.")


# Trace-time settings of the masked layers (`masks_hold`, `implicit_backprop`):
# thread-local, read when a function is traced.
_TRACE = threading.local()


@contextlib.contextmanager
def _trace_setting(name, value):
  """Sets the trace-time setting `name` inside the context, then restores it."""
  previous = getattr(_TRACE, name, None)
  setattr(_TRACE, name, value)
  try:
    yield
  finally:
    setattr(_TRACE, name, previous)


def _masks_held():
  return bool(getattr(_TRACE, "masks_hold", False))


def masks_hold():
  """Traces masked layers inside as computing with the kernel variable directly.

  A promise by the caller, read when a function is traced: every masked kernel
  is zero wherever its mask is (`enforce_masks` makes it so, each optimizer
  update's constraint keeps it so). Under the promise `kernel == kernel * mask`,
  so the forward pass is unchanged and one elementwise pass per kernel is saved;
  the kernel gradient is no longer masked (see `mask_gradients`). LoRA layers
  keep their masked effective kernel.
  """
  return _trace_setting("masks_hold", True)


def implicit_backprop(masks):
  """Traces masked layers inside as back-propagating input gradients through `W * m`.

  SSAM's implicit sparse perturbation (spec 4.4): during SAM's ascent pass the
  listed layers compute their output and kernel gradient with the dense
  kernel, but pass input gradients back through the kernel times `masks[name]`
  (`robust_sparse.nn.implicit_ops.implicit_dense` / `implicit_conv2d`).

  Args:
    masks: {layer name: 0/1 tensor of the layer's kernel shape}.
  """
  return _trace_setting("implicit_masks", masks)


def _implicit_mask(layer):
  masks = getattr(_TRACE, "implicit_masks", None)
  return None if masks is None else masks.get(layer.name)


def enforce_masks(model):
  """Zeroes every masked kernel of `model` where its mask is 0 (the constraint)."""
  for layer in masked_layers(model):
    layer._enforce_mask()


def mask_gradients(model, variables, grads):
  """`grads` of `variables` with each masked kernel's gradient times its mask."""
  masks = {id(layer.raw_kernel): layer.mask for layer in masked_layers(model)}
  return [g if g is None or id(v) not in masks else g * ops.cast(masks[id(v)], g.dtype)
          for v, g in zip(variables, grads)]


class _MaskedKernelConstraint(keras.constraints.Constraint):
  """The user's kernel constraint, then the mask: what the optimizer applies.

  Not serialized: the layer re-creates it in `build`, and `get_config()`
  reports the user's constraint alone, as Keras' own layer does.
  """

  def __init__(self, mask, constraint=None, state=None):
    self.mask = mask
    self.constraint = constraint
    self.state = state

  def __call__(self, w):
    if self.constraint is not None:
      w = self.constraint(w)
    w = ops.multiply(w, ops.cast(self.mask, w.dtype))
    if self.state is not None:
      self.state.expect_masked_write(w)  # The optimizer assigns it next.
    return w


class _MaskState:
  """Whether a layer's kernel is known to be zero wherever its mask is.

  `applied` is a boolean variable, True while the invariant holds. It is not a
  weight of the layer (not saved, not in `layer.weights`, not checkpointed, so
  a restore cannot set it against the kernel it restores).
  """

  def __init__(self, name):
    with tf.init_scope():
      self.applied = tf.Variable(True, trainable=False, name=f"{name}_masks_applied",
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self._masked_value = None

  def expect_masked_write(self, value):
    """`value`, already masked, is what the kernel is assigned next."""
    self._masked_value = value

  def written(self, value=None):
    """A write of the kernel or the mask: clears the flag unless `value` was announced."""
    announced = self._masked_value is not None and value is self._masked_value
    self._masked_value = None
    if not announced:
      self.applied.assign(False)


class _WatchedVariable(keras.Variable):
  """A kernel or mask variable that tells its layer's `_MaskState` of every write.

  Keras' `add_weight` creates the variables; the layer's `build` turns them
  into this class (`_watch`). Every Keras write (`assign`, `assign_add`,
  `assign_sub`, `set_weights`, file loading) goes through `assign`; checkpoint
  restores through `_restore_from_tensors`.
  """

  def assign(self, value):
    result = super().assign(value)
    self._mask_state.written(value)
    return result

  def _restore_from_tensors(self, restored_tensors):
    result = super()._restore_from_tensors(restored_tensors)
    self._mask_state.written()
    return result


def _watch(variable, state) -> bool:
  """Makes `variable` report its writes to `state`; False where it cannot."""
  if type(variable) is not keras.Variable:  # pylint: disable=unidiomatic-typecheck
    return False
  variable.__class__ = _WatchedVariable
  variable._mask_state = state  # pylint: disable=protected-access
  return True


# Keras optimizers whose update of a weight reads that weight's gradient and
# slots only (no norms across weights): the pruned weights' gradients, whose
# update the constraint wipes, then change no other weight.
_ELEMENTWISE_OPTIMIZERS = (keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW,
                           keras.optimizers.Adamax, keras.optimizers.Nadam,
                           keras.optimizers.RMSprop, keras.optimizers.Adagrad,
                           keras.optimizers.Adadelta, keras.optimizers.Ftrl,
                           keras.optimizers.Lion)


def _trained_by_elementwise_optimizer() -> bool:
  """Whether the model being called was compiled with an element-wise optimizer, unclipped.

  Read from Keras' call context when a training call is traced: in
  `model.fit` the entry layer is the model whose `optimizer` applies the
  gradients. Norm clipping (`clipnorm`, `global_clipnorm`) would count the
  pruned weights' gradients, so it keeps them masked.
  """
  context = global_state.get_global_attribute("current_call_ctx")
  optimizer = getattr(getattr(context, "entry_layer", None), "optimizer", None)
  if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
    optimizer = optimizer.inner_optimizer
  return (isinstance(optimizer, _ELEMENTWISE_OPTIMIZERS)
          and getattr(optimizer, "clipnorm", None) is None
          and getattr(optimizer, "global_clipnorm", None) is None)


@tf.custom_gradient
def _with_masked_gradient(kernel, mask):
  """`kernel` itself, whose gradient is multiplied by `mask`."""

  def grad(upstream):
    return upstream * mask, None

  return kernel, grad


class _MaskedKernelRegularizer(keras.regularizers.Regularizer):
  """The user's kernel regulariser applied to `kernel * mask`."""

  def __init__(self, mask, regularizer):
    self.mask = mask
    self.regularizer = regularizer

  def __call__(self, w):
    return self.regularizer(ops.multiply(w, ops.cast(self.mask, w.dtype)))


@tf.custom_gradient
def _mask_keeping_sparse_gradient(kernel, mask):
  """`kernel * mask`, passing an `IndexedSlices` gradient through as one.

  With a `tf.SparseTensor` input, `Dense` gets a sparse kernel gradient (only
  the rows the batch touches); the multiply's own gradient would densify it.
  """

  def grad(upstream):
    if isinstance(upstream, tf.IndexedSlices):
      return tf.IndexedSlices(upstream.values * tf.gather(mask, upstream.indices),
                              upstream.indices, upstream.dense_shape), None
    return upstream * mask, None

  return kernel * mask, grad


class _MaskedKernelMixin:
  """What `MaskedDense` and `MaskedConv2D` share: the mask and its plumbing."""

  _mask_state = None  # A `_MaskState` once built (None: the fast path is off).

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._refuse_quantized_policy()

  # ---- quantization is refused (see the module docstring) ----------------------
  def _refuse_quantized_policy(self, policy=None):
    """Raises if `policy` (default: this layer's, resolved by path) quantizes."""
    if policy is None:
      policy = self.dtype_policy
      if isinstance(policy, keras.dtype_policies.DTypePolicyMap) and self.path:
        policy = policy[self.path]
    if policy.quantization_mode is not None:
      raise ValueError(_QUANTIZATION_REFUSED.format(
          cls=type(self).__name__, name=self.name, received=f"dtype policy {policy.name!r}"))

  def quantize(self, mode=None, type_check=True, config=None):
    # Keras' contract for a layer without quantization (`Layer.quantize`):
    # NotImplementedError, which `Model.quantize` turns into a warning and
    # skips the layer, so a model mixing plain and masked layers quantizes
    # the plain ones and is left consistent (no half-quantized masked layer).
    raise self._not_implemented_error(self.quantize, _QUANTIZATION_REFUSED.format(
        cls=type(self).__name__, name=self.name, received=f"mode={mode!r}"))

  def quantized_call(self, *args, **kwargs):
    # Unreachable through the checks above; should a policy map still route a
    # call here, refuse rather than compute without the mask.
    raise ValueError(_QUANTIZATION_REFUSED.format(
        cls=type(self).__name__, name=self.name, received=f"mode={self.quantization_mode!r}"))

  @property
  def dtype_policy(self):
    return super().dtype_policy

  @dtype_policy.setter
  def dtype_policy(self, value):
    # Keras' setter stores the policy before quantizing; check first, so that a
    # refused policy leaves the layer as it was.
    self._refuse_quantized_policy(keras.dtype_policies.get(value))
    keras.layers.Layer.dtype_policy.fset(self, value)

  # ---- build --------------------------------------------------------------------
  def build(self, input_shape):
    # A policy map keyed by layer path resolves only now that the path is known.
    self._refuse_quantized_policy()
    # Keras enables LoRA at the end of its build and locks the layer's state
    # there; the mask must exist first, and LoRA's effective kernel uses it.
    lora_rank, self.lora_rank = self.lora_rank, None
    try:
      super().build(input_shape)
    finally:
      self.lora_rank = lora_rank
    kernel = self._kernel
    self.mask = self.add_weight(
        name="mask", shape=tuple(kernel.shape), initializer="ones", trainable=False,
        dtype=self.variable_dtype)
    # Not a Keras attribute: the flag is no weight of the layer (see `_MaskState`).
    state = _MaskState(self.name)
    if not (_watch(kernel, state) and _watch(self.mask, state)):
      state = None
    object.__setattr__(self, "_mask_state", state)
    kernel.constraint = _MaskedKernelConstraint(self.mask, self.kernel_constraint, state)
    if self.kernel_regularizer is not None:
      kernel.regularizer = _MaskedKernelRegularizer(self.mask, self.kernel_regularizer)
    if lora_rank:
      # With the constructor's alpha, which `Dense.build` would drop.
      self.enable_lora(lora_rank, lora_alpha=self.lora_alpha)

  # ---- kernels --------------------------------------------------------------------
  @property
  def kernel(self):
    """The kernel variable; with LoRA enabled, the masked effective kernel tensor."""
    kernel = super().kernel
    if self.lora_enabled:
      kernel = ops.multiply(kernel, ops.cast(self.mask, kernel.dtype))
    return kernel

  @property
  def raw_kernel(self):
    """The kernel variable (the same object as `kernel` without LoRA)."""
    return self._kernel

  @property
  def masked_kernel(self):
    """The kernel `call` computes with: `kernel * mask` (LoRA delta included).

    Inside `masks_hold()`, the kernel variable itself (equal by the promise).
    """
    if self.lora_enabled:
      return self.kernel
    if _masks_held():
      return self._kernel
    return ops.multiply(self._kernel, self.mask)

  def _enforce_mask(self):
    """Zeroes the kernel where the mask is 0; the invariant then holds."""
    kernel = self._kernel
    value = kernel * ops.cast(self.mask, kernel.dtype)
    if self._mask_state is None:
      kernel.assign(value)
      return
    self._mask_state.expect_masked_write(value)
    kernel.assign(value)
    self._mask_state.applied.assign(True)

  def _call_kernel(self, training):
    """The kernel `call` computes with: `masked_kernel`, or the fast path's variable.

    In a training call of a layer whose flag is tracked (see the module
    docstring), the kernel is first made zero where masked if a write has
    left it otherwise, then used as it is.
    """
    state = self._mask_state
    replica = tf.distribute.get_replica_context()
    # A stateless call (the step library's) computes with given values, of
    # which the flag knows nothing.
    if (not training or state is None or self.lora_enabled or _masks_held()
        or in_stateless_scope() or self.compute_dtype != self.variable_dtype
        or replica is None or replica.num_replicas_in_sync > 1):
      return self.masked_kernel

    def enforce():
      self._enforce_mask()
      return tf.constant(True)

    applied = tf.cond(state.applied.read_value(), lambda: tf.constant(True), enforce)
    with tf.control_dependencies([applied]):
      kernel = tf.convert_to_tensor(self._kernel)
    if _trained_by_elementwise_optimizer():
      return kernel
    return _with_masked_gradient(kernel, tf.convert_to_tensor(self.mask))

  # ---- saving ---------------------------------------------------------------------
  # Keras' entries, then the mask under a key of its own (the format earlier
  # versions wrote, so their files still load).
  def save_own_variables(self, store):
    super().save_own_variables(store)
    if self.built:
      store["mask"] = self.mask

  def load_own_variables(self, store):
    super().load_own_variables(store)
    if self.built:
      self.mask.assign(store["mask"])


@keras.saving.register_keras_serializable(package="robust_sparse")
class MaskedDense(_MaskedKernelMixin, keras.layers.Dense):
  """`keras.layers.Dense` computing `activation(x @ (kernel * mask) + bias)`.

  Takes `keras.layers.Dense`'s arguments (LoRA included); see the module
  docstring for how the mask composes with constraints, regularisers, LoRA,
  saving, and why `quantize` raises `NotImplementedError`.

  Input shape: `(batch_size, ..., input_dim)`, dense or a `tf.SparseTensor`.
  Output shape: `(batch_size, ..., units)`.
  """

  def call(self, inputs, training=None):
    implicit = _implicit_mask(self)
    if (isinstance(inputs, tf.SparseTensor) and not self.lora_enabled
        and not _masks_held()):
      # Tensors, not variables: `tf.custom_gradient` differentiates through
      # the reads, so the variable still gets the gradient.
      kernel = _mask_keeping_sparse_gradient(tf.convert_to_tensor(self._kernel),
                                             tf.convert_to_tensor(self.mask))
    elif implicit is not None:
      kernel = self.masked_kernel
    else:
      kernel = self._call_kernel(training)
    if implicit is not None and len(inputs.shape) == 2:
      x = implicit_ops.implicit_dense(inputs, kernel, implicit)
    else:
      x = ops.matmul(inputs, kernel)
    if self.bias is not None:
      x = ops.add(x, self.bias)
    if self.activation is not None:
      x = self.activation(x)
    return x


@keras.saving.register_keras_serializable(package="robust_sparse")
class MaskedConv2D(_MaskedKernelMixin, keras.layers.Conv2D):
  """`keras.layers.Conv2D` convolving with `kernel * mask`.

  Takes `keras.layers.Conv2D`'s arguments (LoRA included); see the module
  docstring for how the mask composes with constraints, regularisers, LoRA,
  saving, and why `quantize` raises `NotImplementedError`.

  Input shape: `(batch_size, height, width, channels)` ("channels_last") or
  `(batch_size, channels, height, width)`. Output shape: as `Conv2D`'s.
  """

  def call(self, inputs, training=None):
    implicit = _implicit_mask(self)
    if (implicit is not None and self.data_format == "channels_last" and self.groups == 1
        and self.padding in ("same", "valid")):
      outputs = implicit_ops.implicit_conv2d(inputs, self.masked_kernel, implicit,
                                             strides=list(self.strides),
                                             padding=self.padding.upper(),
                                             dilations=list(self.dilation_rate))
    else:
      outputs = self.convolution_op(
          inputs, self.masked_kernel if implicit is not None else self._call_kernel(training))
    if self.use_bias:
      if self.data_format == "channels_last":
        bias_shape = (1,) * (self.rank + 1) + (self.filters,)
      else:
        bias_shape = (1, self.filters) + (1,) * self.rank
      outputs = ops.add(outputs, ops.reshape(self.bias, bias_shape))
    if self.activation is not None:
      return self.activation(outputs)
    return outputs


MASKED_LAYER_TYPES = (MaskedDense, MaskedConv2D)


def masked_layers(model):
  """The masked layers of `model`, in the order they compute (nested models in place).

  Keras' recursive `_flatten_layers` lists a nested model's layers last to
  first; this walks each level in order and descends depth first.
  """
  found, seen = [], set()

  def walk(parent):
    for layer in parent._flatten_layers(include_self=False, recursive=False):
      if id(layer) in seen:
        continue
      seen.add(id(layer))
      if isinstance(layer, MASKED_LAYER_TYPES):
        found.append(layer)
      else:
        walk(layer)

  walk(model)
  return found


def _plain_layer_type(layer):
  return keras.layers.Dense if isinstance(layer, MaskedDense) else keras.layers.Conv2D


def clone_layer_pairs(model, clone_function, caller: str):
  """`keras.models.clone_model(model, clone_function)` and its (original, clone) leaf layers.

  The pairs are the layers that hold weights, in the same order on both sides
  (nested models descended into, not listed), for the caller to copy weights
  across. Input layers hold none, and the clone renames them.

  Raises:
    ValueError: naming `caller`, when the clone does not list the same layers
      (a subclassed model).
  """
  copy = keras.models.clone_model(model, clone_function=clone_function, recursive=True)

  def weighted_layers(m):
    return [layer for layer in m._flatten_layers(include_self=False)
            if not isinstance(layer, keras.layers.InputLayer)]

  old_layers, new_layers = weighted_layers(model), weighted_layers(copy)
  if [layer.name for layer in old_layers] != [layer.name for layer in new_layers]:
    raise ValueError(f"{caller}: the clone of model '{model.name}' does not list the same "
                     "layers; only Sequential and functional models are supported")
  # A nested model's own layers are paired one by one.
  return copy, [(old, new) for old, new in zip(old_layers, new_layers)
                if not list(old._flatten_layers(include_self=False))]


def strip_masks(model):
  """A copy of `model` whose masked layers are plain Keras layers with `kernel * mask`.

  The counterpart of tensorflow/model-optimization's `strip_pruning`, for export
  and for quantization (which masked layers refuse): each `MaskedDense` /
  `MaskedConv2D` becomes a `keras.layers.Dense` / `Conv2D` with the same config
  whose kernel is the masked kernel, LoRA delta merged in (the copy has no
  LoRA weights); every other layer is cloned with its weights. The copy
  computes the same outputs, and pruned weights are exact zeros of its kernels.

  Args:
    model: a Sequential or functional `keras.Model` (nested ones included).

  Returns:
    The new model; `model` is left unchanged.

  Raises:
    ValueError: if `model` is subclassed (Keras cannot clone those).
  """

  def clone(layer):
    config = layer.get_config()
    if isinstance(layer, MASKED_LAYER_TYPES):
      # The merged kernel below replaces the LoRA weights.
      config.pop("lora_rank", None)
      config.pop("lora_alpha", None)
      return _plain_layer_type(layer).from_config(config)
    return layer.__class__.from_config(config)

  stripped, pairs = clone_layer_pairs(model, clone, "strip_masks")
  for old, new in pairs:
    if isinstance(old, MASKED_LAYER_TYPES):
      weights = [ops.convert_to_numpy(old.masked_kernel)]
      if old.use_bias:
        weights.append(old.bias.numpy())
      new.set_weights(weights)
    else:
      new.set_weights(old.get_weights())
  return stripped
