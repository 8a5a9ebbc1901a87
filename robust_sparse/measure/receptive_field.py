"""Receptive fields of every conv layer (phd-lab, spec 5.5), and a model's compute cost.

The receptive field explains which layers of a network can still add
information: a layer whose receptive field exceeds the input (or the
discriminative features) tends to be "unproductive" (Richter et al.).

`receptive_fields(model)` follows phd-lab's `receptive_field.py`: starting
from the input with jump j = 1, receptive field r = 1 and start = 0.5, every
conv and max-pool layer on the way, in call order, applies

  k_eff = k + (k - 1)(d - 1);  r += (k_eff - 1) j;
  start += ((k_eff - 1) / 2 - p) j;  j *= s

(k kernel, d dilation, p padding on the top/left, s stride). Keras layers are
mapped onto that: a `ZeroPadding2D` moves `start` by its top padding (the
toolkit's PyTorch-padded convs are a ZeroPadding2D and a 'valid' conv), a
'same' layer pads like TensorFlow (the top gets the smaller half), an average
pool gives NaN as in phd-lab, and layers that keep the map size (batch norm,
activations, dropout, normalisation) pass it on. Skip paths are ignored, as
phd-lab does by rebuilding ResNets without them: where branches merge
(`Add`, ...), the branch with the largest receptive field goes on, and only
the conv layers on that main path get a row. Receptive fields are given for
the vertical axis (rows); the toolkit's kernels are square.

`compute_cost(model)` counts multiply-accumulates analytically.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import keras
import pandas as pd
from keras import tree

from robust_sparse.core.files import atomic_open
from robust_sparse.measure.saturation import graph_nodes

# Layers that the receptive-field recursion treats as convolutions (PyTorch's
# Conv2d covers grouped and depthwise convolutions too).
CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
COLUMNS = ("Layer", "map_size", "start", "jump", "receptive_field")


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
  """One conv layer's row of the receptive-field table.

  Attributes:
    layer: the Keras layer name.
    map_size: the output map's height (None when the input size is unknown).
    start: centre of the first output unit's field, in input pixels.
    jump: input pixels between neighbouring output units.
    receptive_field: the field's side in input pixels.
    seed_name: phd-lab's name, "<index>-Conv2d", counting the input (0) and
      every conv, 4-D batch norm and pooling layer on the main path.
  """
  layer: str
  map_size: Optional[int]
  start: float
  jump: float
  receptive_field: float
  seed_name: str


@dataclasses.dataclass(frozen=True)
class _State:
  jump: float
  field: float
  start: float


_NAN = _State(math.nan, math.nan, math.nan)


def _first(value):
  return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def _same_padding(size, kernel, stride):
  """TensorFlow's 'same' padding on the top/left (the smaller half)."""
  if stride == 1:
    return (kernel - 1) // 2
  if size is None:
    raise ValueError("a 'same' layer needs a known input size to place its padding; build the "
                     "model for a fixed input shape or pass input_shape")
  out = -(-size // stride)
  return max((out - 1) * stride + kernel - size, 0) // 2


def _window(layer, size):
  """(k_eff, stride, top padding) of a conv or pooling layer, or None for another layer."""
  if isinstance(layer, CONV_TYPES):
    kernel, stride = _first(layer.kernel_size), _first(layer.strides)
    dilation = _first(layer.dilation_rate)
    padding = layer.padding
  elif hasattr(layer, "pool_size") and hasattr(layer, "strides") and hasattr(layer, "padding"):
    kernel, stride, dilation = _first(layer.pool_size), _first(layer.strides), 1
    padding = layer.padding
  else:
    return None
  effective = kernel + (kernel - 1) * (dilation - 1)
  if isinstance(padding, str):
    padding = 0 if padding == "valid" else _same_padding(size, effective, stride)
  else:  # PyTorch-style symmetric integer padding (`TorchMaxPooling2D`).
    padding = _first(padding)
  return effective, stride, padding


def _is_pooling(layer):
  return (not isinstance(layer, CONV_TYPES) and hasattr(layer, "pool_size")
          and hasattr(layer, "strides") and hasattr(layer, "padding"))


def _is_average_pooling(layer):
  return _is_pooling(layer) and "average" in type(layer).__name__.lower()


def _output_shapes(nodes, functional, input_shape):
  """Static shapes of every node output, re-traced for `input_shape` when given."""
  if input_shape is None:
    return {id(t): tuple(t.shape) for node in nodes for t in node.outputs} | {
        id(t): tuple(t.shape) for t in functional.inputs}
  if len(functional.inputs) != 1:
    raise ValueError(f"input_shape works for one-input models; model {functional.name!r} has "
                     f"{len(functional.inputs)}")
  reference = functional.inputs[0]
  specs = {id(reference): keras.KerasTensor((None,) + tuple(input_shape), reference.dtype)}
  for node in nodes:
    args, kwargs = node.arguments.fill_in(specs)
    outputs = node.operation.compute_output_spec(*args, **kwargs)
    for ref, out in zip(node.outputs, tree.flatten(outputs)):
      specs[id(ref)] = out
  return {key: tuple(spec.shape) for key, spec in specs.items()}


def _functional_of(model):
  return model._functional if isinstance(model, keras.Sequential) else model


def receptive_fields(model, input_shape: Optional[Sequence[int]] = None) -> List[ReceptiveField]:
  """phd-lab's receptive field of every conv layer on the model's main path.

  Args:
    model: a functional (or built Sequential) Keras model with one image input.
    input_shape: (height, width, channels) to compute the map sizes and 'same'
      paddings for; None: the shape the model was built for.

  Returns:
    One `ReceptiveField` per conv layer on the main path, in call order.

  Raises:
    ValueError: for a subclassed model, or a layer other than conv, pooling
      and padding that changes the map size (e.g. an up-sampling layer).
  """
  nodes = graph_nodes(model)
  functional = _functional_of(model)
  shapes = _output_shapes(nodes, functional, input_shape)
  states = {id(t): (_State(1.0, 1.0, 0.5), None) for t in functional.inputs}
  for node in nodes:
    layer, inputs = node.operation, list(node.input_tensors)
    known = [t for t in inputs if id(t) in states]
    if not known:
      continue
    # The main path: the branch with the largest field (the first one on ties).
    source = max(known, key=lambda t: (_order(states[id(t)][0].field), -known.index(t)))
    state = states[id(source)][0]
    in_shape = shapes[id(source)]
    for output in node.outputs:
      out_shape = shapes[id(output)]
      window = _window(layer, in_shape[1]) if len(in_shape) == 4 else None
      if len(out_shape) != 4:
        new = _NAN
      elif isinstance(layer, keras.layers.ZeroPadding2D):
        top = _first(layer.padding[0])
        new = _State(state.jump, state.field, state.start - top * state.jump)
      elif window is not None and _is_average_pooling(layer):
        new = _NAN
      elif window is not None:
        effective, stride, padding = window
        new = _State(state.jump * stride, state.field + (effective - 1) * state.jump,
                     state.start + ((effective - 1) / 2 - padding) * state.jump)
      elif len(in_shape) == 4 and out_shape[1:3] != in_shape[1:3]:
        raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) changes the map size "
                         f"from {in_shape[1:3]} to {out_shape[1:3]}, which the receptive-field "
                         f"recursion does not cover")
      else:
        new = state
      states[id(output)] = (new, (id(source), node))

  # Walk back from the output along the chosen branches.
  path, current = [], id(tree.flatten(functional.outputs)[0])
  while states.get(current, (None, None))[1] is not None:
    current, node = states[current][1]
    path.append(node)
  path.reverse()

  rows, index = [], 0
  for node in path:
    layer = node.operation
    in_rank = len(shapes[id(node.input_tensors[0])])
    if (isinstance(layer, CONV_TYPES) or _is_pooling(layer)
        or (isinstance(layer, keras.layers.BatchNormalization) and in_rank == 4)):
      index += 1
    if isinstance(layer, CONV_TYPES):
      state = states[id(node.outputs[0])][0]
      size = shapes[id(node.outputs[0])][1]
      rows.append(ReceptiveField(layer=layer.name, map_size=size, start=state.start,
                                 jump=state.jump, receptive_field=state.field,
                                 seed_name=f"{index}-Conv2d"))
  return rows


def _order(value):
  """NaN fields sort below every number."""
  return -math.inf if math.isnan(value) else value


def write_receptive_field_csv(path: str, rows: Sequence[ReceptiveField], *,
                              seed_names: bool = False):
  """Writes phd-lab's `receptive_field_*.csv` (`;`, `Layer;map_size;start;jump;receptive_field`).

  As phd-lab's pandas `to_csv(sep=';')`, the first column is the unnamed row
  index (so the header reads `;Layer;map_size;...`) and the numbers are
  floats (`3.0`) except the map size. Written atomically.

  Args:
    path: the CSV file.
    rows: `receptive_fields(...)`.
    seed_names: name the layers "<index>-Conv2d" as phd-lab; default the
      Keras layer names (which the saturation columns use).
  """
  frame = pd.DataFrame({
      "Layer": [row.seed_name if seed_names else row.layer for row in rows],
      "map_size": pd.array([row.map_size for row in rows], dtype="Int64"),
      "start": [float(row.start) for row in rows],
      "jump": [float(row.jump) for row in rows],
      "receptive_field": [float(row.receptive_field) for row in rows],
  }, columns=list(COLUMNS))
  with atomic_open(path) as f:
    frame.to_csv(f, sep=";")


# ---- compute cost ------------------------------------------------------------------
def _macs(layer, in_shape, out_shape) -> int:
  """Multiply-accumulates of one conv or dense call for one example."""
  if isinstance(layer, keras.layers.SeparableConv2D):
    kernel = math.prod(int(k) for k in layer.kernel_size)
    channels = int(in_shape[-1])
    positions = int(out_shape[1]) * int(out_shape[2])
    depthwise = positions * kernel * channels * int(layer.depth_multiplier)
    return depthwise + positions * channels * int(layer.depth_multiplier) * int(out_shape[-1])
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    kernel = math.prod(int(k) for k in layer.kernel_size)
    return int(out_shape[1]) * int(out_shape[2]) * kernel * int(out_shape[-1])
  if isinstance(layer, keras.layers.Conv2D):
    kernel = math.prod(int(k) for k in layer.kernel_size)
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    in_channels = int(in_shape[1] if channels_first else in_shape[-1])
    out_channels = int(out_shape[1] if channels_first else out_shape[-1])
    spatial = out_shape[2:] if channels_first else out_shape[1:-1]
    return (math.prod(int(s) for s in spatial) * kernel * in_channels // int(layer.groups)
            * out_channels)
  if isinstance(layer, keras.layers.Dense):
    return math.prod(int(s) for s in in_shape[1:]) * int(out_shape[-1])
  return 0


def compute_cost(model, input_shape: Optional[Sequence[int]] = None) -> Dict[str, int]:
  """FLOPs, MACs and parameters of one forward pass of one example, counted analytically.

  Only the conv and dense layers' multiply-accumulates are counted (batch
  norm, activations, pooling and bias additions are left out, as they are a
  small share); FLOPs = 2 MACs. Parameters are the trainable weights (the
  pruning masks are not parameters).

  Args:
    model: a functional (or built Sequential) Keras model.
    input_shape: (height, width, channels) to count for; None: the shape
      the model was built for.

  Returns:
    `{"flops": int, "macs": int, "params": int}`.

  Raises:
    ValueError: for a subclassed model or an input size the model left unknown.
  """
  nodes = graph_nodes(model)
  shapes = _output_shapes(nodes, _functional_of(model), input_shape)
  macs = 0
  for node in nodes:
    in_shape = shapes[id(node.input_tensors[0])]
    out_shape = shapes[id(node.outputs[0])]
    if isinstance(node.operation, CONV_TYPES + (keras.layers.Dense,)):
      if any(s is None for s in tuple(in_shape[1:]) + tuple(out_shape[1:])):
        raise ValueError(f"layer {node.operation.name!r} has an unknown input size "
                         f"{in_shape}; pass input_shape")
      macs += _macs(node.operation, in_shape, out_shape)
  params = sum(math.prod(int(s) for s in v.shape) for v in model.trainable_weights)
  return {"flops": 2 * macs, "macs": macs, "params": params}


def _human(value: float, unit: str) -> str:
  """ptflops-style strings: '313.73 MMac', '11.17 M'."""
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
    if value >= scale:
      return f"{value / scale:.2f} {prefix}{unit}"
  return f"{value:.0f} {unit}"


def computational_info(model, input_shape: Optional[Sequence[int]] = None, *,
                       n_samples: int, epochs: int) -> Dict[str, object]:
  """phd-lab's `computational_info.json` content, from `compute_cost`.

  Args:
    model, input_shape: see `compute_cost`.
    n_samples: training samples per epoch as phd-lab counts them (its
      loader's batches times the batch size: 50048 for CIFAR-10 at 64).
    epochs: training epochs.

  Returns:
    phd-lab's keys: "flops", "macs", "params" and "total flops" = macs * 2 *
    3 * n_samples * epochs (a forward and a backward pass of about twice its
    cost, per sample and epoch), their strings ("flops_str", ...), and the
    "n_samples" and "epochs" used.
  """
  cost = compute_cost(model, input_shape)
  total = cost["macs"] * 2 * 3 * int(n_samples) * int(epochs)
  return {"flops": cost["flops"], "macs": cost["macs"], "params": cost["params"],
          "total flops": total, "flops_str": _human(cost["flops"], "Flop"),
          "macs_str": _human(cost["macs"], "Mac"), "params_str": _human(cost["params"], ""),
          "total flops_str": _human(total, "Flop"), "n_samples": int(n_samples),
          "epochs": int(epochs)}
