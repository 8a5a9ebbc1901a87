"""Receptive fields (phd-lab's recursion, spec 5.5) and the analytic compute cost."""

import math

import keras
import numpy as np
import pytest

from robust_sparse.models import build_model
from robust_sparse.measure.receptive_field import (compute_cost, computational_info,
                                                   receptive_fields, write_receptive_field_csv)

# Spec 5.5's computed anchors at 32 px: the receptive field of every conv layer.
SPEC_5_5 = {
    "vgg11": [3, 8, 18, 26, 46, 62, 102, 134],
    "vgg13": [3, 5, 10, 14, 24, 32, 52, 68, 108, 140],
    "vgg16": [3, 5, 10, 14, 24, 32, 40, 60, 76, 92, 132, 164, 196],
    "vgg19": [3, 5, 10, 14, 24, 32, 40, 48, 68, 84, 100, 116, 156, 188, 220, 252],
    "resnet18_imagenet": [7, 19, 27, 35, 43, 51, 67, 83, 99, 115, 147, 179, 211, 243, 307, 371,
                          435],
    "resnet18_pc": [3, 5, 7, 9, 11, 13, 17, 21, 25, 29, 37, 45, 53, 61, 77, 93, 109],
}


@pytest.mark.parametrize("name", sorted(SPEC_5_5))
def test_receptive_fields_equal_spec_5_5(name):
  rows = receptive_fields(build_model(name, (32, 32, 3), 10))
  assert [row.receptive_field for row in rows] == SPEC_5_5[name]


def test_skip_paths_are_ignored_as_the_seed_rebuilds_resnets_without_them():
  with_skips = receptive_fields(build_model("resnet18_imagenet", (32, 32, 3), 10))
  without = receptive_fields(build_model("resnet18_imagenet_noskip", (32, 32, 3), 10))
  assert with_skips == without
  assert not any("shortcut" in row.layer for row in with_skips)
  assert [row.map_size for row in with_skips] == [16] + [8] * 4 + [4] * 4 + [2] * 4 + [1] * 4


def test_vgg11_rows_and_the_seed_csv(tmp_path):
  rows = receptive_fields(build_model("vgg11", (32, 32, 3), 10))
  # By hand: conv (k3 p1) keeps start, a 2x2 pool moves it by half a jump.
  assert [(r.layer, r.map_size, r.start, r.jump, r.seed_name) for r in rows[:3]] == [
      ("block1_conv1", 32, 0.5, 1.0, "1-Conv2d"),  # input 0, conv 1, BN 2, pool 3
      ("block2_conv1", 16, 1.0, 2.0, "4-Conv2d"),
      ("block3_conv1", 8, 2.0, 4.0, "7-Conv2d")]
  path = str(tmp_path / "receptive_field_vgg11_Cifar10_32.csv")
  write_receptive_field_csv(path, rows)
  with open(path) as f:
    lines = f.read().splitlines()
  assert lines[:2] == [";Layer;map_size;start;jump;receptive_field",
                       "0;block1_conv1;32;0.5;1.0;3.0"]
  write_receptive_field_csv(path, rows, seed_names=True)
  with open(path) as f:
    assert f.read().splitlines()[-1] == "7;19-Conv2d;2;8.0;16.0;134.0"


def _branching_model():
  inputs = keras.Input((16, 16, 3))
  x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="strided")(inputs)  # 'same'
  side = keras.layers.Conv2D(4, 1, name="side")(x)
  main = keras.layers.ZeroPadding2D(((3, 5), (3, 5)), name="pad")(x)
  main = keras.layers.Conv2D(4, 5, dilation_rate=2, name="dilated")(main)  # k_eff 9
  main = keras.layers.Conv2D(4, 3, padding="same", name="main")(main)
  x = keras.layers.Add(name="add")([side, main])
  x = keras.layers.AveragePooling2D(2, name="avg")(x)
  x = keras.layers.Conv2D(4, 3, padding="same", name="after_avg")(x)
  return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_keras_padding_dilation_merges_and_average_pooling():
  rows = {row.layer: row for row in receptive_fields(_branching_model())}
  assert list(rows) == ["strided", "dilated", "main", "after_avg"]  # "side" is a skip path.
  # 'same' stride 2 on 16 pads (7 * 2 + 3 - 16) // 2 = 0 on the top.
  assert (rows["strided"].receptive_field, rows["strided"].start, rows["strided"].jump) == (
      3, 1.5, 2)
  # Top padding 3 then a valid dilated 5x5: r += 8 * 2, start += (4 - 3) * 2.
  assert (rows["dilated"].receptive_field, rows["dilated"].start, rows["dilated"].map_size) == (
      19, 3.5, 8)
  assert rows["main"].receptive_field == 23
  assert math.isnan(rows["after_avg"].receptive_field)  # phd-lab: AvgPool2d gives NaN.


def test_layers_the_recursion_does_not_cover_are_refused():
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
  x = keras.layers.UpSampling2D(name="up")(x)
  with pytest.raises(ValueError, match="up"):
    receptive_fields(keras.Model(inputs, x))


def test_compute_cost_counts_conv_and_dense_multiply_accumulates():
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)  # 8*8 * 3*3*3 * 4
  x = keras.layers.Conv2D(6, 2, strides=2, use_bias=False, name="strided")(x)  # 4*4 * 2*2*4 * 6
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  model = keras.Model(inputs, keras.layers.Dense(10, name="dense")(x))  # 6 * 10
  macs = 6912 + 1536 + 60
  params = (3 * 3 * 3 * 4 + 4) + 2 * 2 * 4 * 6 + 2 * 6 + (6 * 10 + 10)
  assert compute_cost(model) == {"flops": 2 * macs, "macs": macs, "params": params}
  bigger = compute_cost(model, (16, 16, 3))
  assert bigger["macs"] == 4 * (6912 + 1536) + 60
  info = computational_info(model, n_samples=100, epochs=2)
  assert info["total flops"] == macs * 2 * 3 * 100 * 2


def test_masks_are_not_parameters():
  model = build_model("vgg11", (32, 32, 3), 10)
  cost = compute_cost(model)
  assert cost["params"] == 9_361_418  # The README's count for vgg11.
  assert cost["params"] == sum(int(np.prod(v.shape)) for v in model.trainable_weights)
