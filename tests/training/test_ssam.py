"""SSAM's masks: Fisher information, SSAM-F patterns, SSAM-D updates, implicit perturbation.

References are independent of the code under test: the Fisher information
against a Python loop of single-example tape gradients, the seed's N:M conv
masks against a line-by-line numpy transcription of its PyTorch code, the
implicit layers' gradients against closed forms and autodiff of the masked op.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.models import build_model
from robust_sparse.training.sharpness import ssam
from robust_sparse.nn import implicit_ops
from robust_sparse.nn.layers import enforce_masks, masked_layers, masks_hold
from robust_sparse.training.optimizers import make_optimizer
from robust_sparse.training.sharpness.sam import sharpness_aware
from robust_sparse.training.steps import (OptimizerGroup, cross_entropy, loss_and_gradients,
                                 make_train_step)


def _bn_model():
  keras.utils.set_random_seed(3)
  return build_model("conv-bn", (8, 8, 3), 10)


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return (tf.constant(rng.normal(size=(n, 8, 8, 3)), tf.float32),
          tf.constant(rng.integers(0, 10, n), tf.int32))


def _loop_fisher(model, x, y):
  """sum_i (dL_i/dp)^2 by a Python loop of batch-1 tape gradients (moves BN statistics)."""
  loss = cross_entropy(10)
  totals = [np.zeros(v.shape, np.float64) for v in model.trainable_variables]
  for i in range(x.shape[0]):
    with tf.GradientTape() as tape:
      logits = model(x[i:i + 1], training=True)
      value = tf.reduce_sum(loss(x[i:i + 1], y[i:i + 1], logits))
    for total, g in zip(totals, tape.gradient(value, model.trainable_variables)):
      total += np.square(g.numpy().astype(np.float64))
  return totals


def _assert_close_relative(got, want, rtol=1e-5):
  for g, w in zip(got, want):
    g = np.asarray(g, np.float64)
    scale = np.linalg.norm(w)
    assert scale > 0
    assert np.linalg.norm(g - w) <= rtol * scale, (np.linalg.norm(g - w) / scale)


# ---- Fisher information ------------------------------------------------------------------
def test_fisher_equals_a_loop_over_single_examples_and_leaves_the_state_alone():
  model = _bn_model()
  x, y = _images(6)
  before = [v.numpy().copy() for v in model.non_trainable_variables]
  # 6 examples in chunks of 4: the padded last chunk must not count.
  fisher = ssam.fisher_information(model, cross_entropy(10), x, y, chunk_size=4)
  for variable, value in zip(model.non_trainable_variables, before):
    np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
  assert [tuple(f.shape) for f in fisher] == [tuple(v.shape) for v in model.trainable_variables]
  _assert_close_relative(fisher, _loop_fisher(model, x, y))


def test_fisher_sees_the_augmented_examples_and_needs_a_seed_for_them():
  model = _bn_model()
  x, y = _images(3, seed=1)

  def augment(images, labels, seed):
    return tf.image.stateless_random_flip_left_right(images, seed) * 1.5, labels

  seed = tf.constant([4, 2], tf.int64)
  fisher_fn = ssam.make_fisher_information(model, cross_entropy(10), augment=augment)
  augmented, _ = augment(x, y, seed)
  _assert_close_relative(fisher_fn(x, y, seed), _loop_fisher(model, augmented, y))
  with pytest.raises(ValueError, match="seed"):
    fisher_fn(x, y)


def test_fisher_of_pruned_weights_is_zero_even_under_masks_hold():
  model = _bn_model()
  layer = masked_layers(model)[0]
  mask = np.ones(layer.mask.shape, np.float32)
  mask.reshape(-1)[::2] = 0.0
  layer.mask.assign(mask)
  enforce_masks(model)
  x, y = _images(2)
  fisher_fn = ssam.make_fisher_information(model, cross_entropy(10))
  with masks_hold():  # The layers then compute with the kernel; the gradient is unmasked.
    fisher = fisher_fn(x, y)
  index = [id(v) for v in model.trainable_variables].index(id(layer.raw_kernel))
  values = fisher[index].numpy()
  assert np.all(values[mask == 0] == 0.0)
  assert np.all(values[mask == 1] > 0.0)


# ---- SSAM-F masks ------------------------------------------------------------------------
def _variables(shapes):
  return [tf.Variable(tf.zeros(shape), name=f"v{i}") for i, shape in enumerate(shapes)]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.97])
def test_unstructured_keeps_exactly_the_global_top_k(sparsity):
  shapes = [(3, 3, 2, 4), (4,), (36, 10), (10,)]
  rng = np.random.default_rng(0)
  # Rounded scores: many ties, including exact zeros as for unused weights.
  scores = [np.round(rng.random(shape) * 20) / 20 for shape in shapes]
  masks = ssam.fisher_masks([tf.constant(s, tf.float32) for s in scores], _variables(shapes),
                            sparsity=sparsity, pattern="unstructured")
  flat_scores = np.concatenate([s.ravel() for s in scores])
  flat_masks = np.concatenate([m.numpy().ravel() for m in masks])
  assert set(np.unique(flat_masks)) <= {0.0, 1.0}
  assert flat_masks.sum() == int(flat_scores.size * (1 - sparsity))
  if 0 < flat_masks.sum() < flat_masks.size:
    assert flat_scores[flat_masks == 1].min() >= flat_scores[flat_masks == 0].max()
  # Ties go to the earlier entry: the result is the stable descending order's prefix.
  order = np.argsort(-flat_scores.astype(np.float32), kind="stable")
  expected = np.zeros(flat_scores.size)
  expected[order[:int(flat_scores.size * (1 - sparsity))]] = 1
  np.testing.assert_array_equal(flat_masks, expected)
  if sparsity == 0.0:
    assert flat_masks.all()


def test_structured_keeps_whole_tensors_by_mean_and_the_last_may_overshoot():
  shapes = [(5,), (10,), (20,)]  # N = 35.
  means = [2.0, 3.0, 1.0]  # Kept in the order 10, 5, 20.
  scores = [tf.fill(shape, mean) for shape, mean in zip(shapes, means)]
  variables = _variables(shapes)

  def kept(sparsity):
    masks = ssam.fisher_masks(scores, variables, sparsity=sparsity, pattern="structured")
    for m in masks:
      assert np.unique(m.numpy()).size == 1  # Whole tensors.
    return [bool(m.numpy()[0]) for m in masks]

  assert kept(0.0) == [True, True, True]
  # Budget int(35 * 0.3) = 10: the 10-tensor fills it, nothing else is started.
  assert kept(0.7) == [False, True, False]
  # Budget int(35 * 0.4) = 14 > 10: the 5-tensor is started and overshoots to 15.
  assert kept(0.6) == [True, True, False]
  # Budget int(35 * 0.6) = 21 > 15: the 20-tensor is started too.
  assert kept(0.4) == [True, True, True]


def _groups_keep_largest(scores, masks, n, m):
  """Rows of `scores`/`masks` in groups of m: exactly n kept, the n largest."""
  scores, masks = scores.reshape(-1, m), masks.reshape(-1, m)
  np.testing.assert_array_equal(masks.sum(1), n)
  kept_min = np.where(masks == 1, scores, np.inf).min(1)
  dropped_max = np.where(masks == 0, scores, -np.inf).max(1)
  assert np.all(kept_min >= dropped_max)


def _get_nm_mask(fisher, n, m):
  """The seed's `solver/utils.py: get_nm_mask`, transcribed to numpy."""
  groups = fisher.reshape(-1, m)  # fisher.reshape(group, m), in logical (C) order.
  index = np.argsort(groups, axis=1, kind="stable")[:, :m - n]
  mask = np.ones_like(groups)
  np.put_along_axis(mask, index, 0, axis=1)
  return mask.reshape(fisher.shape)


def _seed_implicit_conv(fisher, n, m):
  """The seed's implicit path: `get_nm_mask` on the (co, ci, kh, kw) Fisher; Keras layout."""
  return _get_nm_mask(fisher.transpose(3, 2, 0, 1), n, m).transpose(2, 3, 1, 0)


def _seed_ssamf_conv(fisher, n, m):
  """The seed's SSAMF nm branch for a conv (spec 4.2 [BUG]), on a Keras kernel."""
  torch_fisher = fisher.transpose(3, 2, 0, 1)  # (co, ci, kh, kw)
  co, ci, kh, kw = torch_fisher.shape
  transposed = torch_fisher.reshape(co, -1).T  # fisher.view(co, -1).t()
  mask = _get_nm_mask(transposed, n, m)  # A new C-ordered (ci*kh*kw, co) array.
  return mask.reshape(co, ci, kh, kw).transpose(2, 3, 1, 0)  # mask.view(co, cin, k1, k2)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (3, 8)])
def test_nm_dense_and_conv_keep_n_of_every_m_along_the_input(n, m):
  rng = np.random.default_rng(1)
  shapes = [(3, 3, 8, 6), (16, 5), (6,)]
  scores = [rng.random(shape).astype(np.float32) for shape in shapes]
  masks = [v.numpy() for v in ssam.fisher_masks(
      [tf.constant(s) for s in scores], _variables(shapes), sparsity=0.2, pattern="nm",
      n=n, m=m)]
  conv_scores, dense_scores, _ = scores
  conv_mask, dense_mask, vector_mask = masks
  # Dense [in, out]: groups along `in` for each output unit.
  _groups_keep_largest(dense_scores.T, dense_mask.T, n, m)
  # Conv [kh, kw, in, out]: groups along PyTorch's (in, kh, kw) of each filter.
  _groups_keep_largest(conv_scores.transpose(3, 2, 0, 1), conv_mask.transpose(3, 2, 0, 1), n, m)
  np.testing.assert_array_equal(conv_mask, _seed_implicit_conv(conv_scores, n, m))
  assert vector_mask.all()
  # The seed's layout: its exact (scrambled) positions, still N:M in PyTorch memory
  # order since in*kh*kw = 72 is divisible by M, but not the largest of each group.
  seed_masks = ssam.fisher_masks([tf.constant(s) for s in scores], _variables(shapes),
                                 sparsity=0.2, pattern="nm", n=n, m=m, nm_conv_layout="seed")
  seed_conv = seed_masks[0].numpy()
  np.testing.assert_array_equal(seed_conv, _seed_ssamf_conv(conv_scores, n, m))
  np.testing.assert_array_equal(seed_conv.transpose(3, 2, 0, 1).reshape(-1, m).sum(1), n)
  assert np.any(seed_conv != conv_mask)
  np.testing.assert_array_equal(seed_masks[1].numpy(), dense_mask)  # Dense: no bug.


@pytest.mark.parametrize("layout,reference", [("correct", _seed_implicit_conv),
                                              ("seed", _seed_ssamf_conv)])
def test_nm_conv_groups_straddle_filters_whose_fan_in_m_does_not_divide(layout, reference):
  # in*kh*kw = 2*3*3 = 18 (ResNet-18's stem: 27) is not divisible by M = 4, the size
  # 72 is: as in the seed, groups run on through PyTorch's memory order.
  rng = np.random.default_rng(2)
  scores = rng.random((3, 3, 2, 4)).astype(np.float32)
  mask = ssam.fisher_masks([tf.constant(scores)], _variables([scores.shape]), sparsity=0.0,
                           pattern="nm", n=2, m=4, nm_conv_layout=layout)[0].numpy()
  np.testing.assert_array_equal(mask, reference(scores, 2, 4))
  np.testing.assert_array_equal(mask.transpose(3, 2, 0, 1).reshape(-1, 4).sum(1), 2)
  with pytest.raises(ValueError, match=r"--m_structured=2 does not divide the size 9 of v0"):
    ssam.fisher_masks([tf.ones([1, 1, 3, 3])], _variables([(1, 1, 3, 3)]), sparsity=0.0,
                      pattern="nm", n=1, m=2, nm_conv_layout=layout)


# ---- with the SAM wrapper ----------------------------------------------------------------
def _one_step(model, initial, fn):
  model.set_weights(initial)
  step = make_train_step(model, fn, [OptimizerGroup("weights", make_optimizer("sgd", 0.1))])
  x, y = _images(8, seed=5)
  step(x, y, tf.constant(0, tf.int64), tf.constant(0, tf.int64))
  return [v.numpy() for v in model.trainable_variables]


def test_ssamf_limits_all_ones_is_sam_and_all_zeros_is_the_base_optimizer():
  model = _bn_model()
  initial = model.get_weights()
  variables = model.trainable_variables
  base = loss_and_gradients(model, cross_entropy(10))
  rng = np.random.default_rng(3)
  scores = [tf.constant(rng.random(v.shape), tf.float32) for v in variables]
  ones = ssam.fisher_masks(scores, variables, sparsity=0.0, pattern="unstructured")
  assert all(m.numpy().all() for m in ones)
  zeros = [tf.zeros_like(m) for m in ones]

  plain = _one_step(model, initial, base)
  sam = _one_step(model, initial, sharpness_aware(base, model, rho=0.5))
  masked_ones = _one_step(model, initial, sharpness_aware(base, model, rho=0.5,
                                                           mask_fn=lambda: ones))
  masked_zeros = _one_step(model, initial, sharpness_aware(base, model, rho=0.5,
                                                            mask_fn=lambda: zeros))
  for got, want in zip(masked_ones, sam):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
  for got, want in zip(masked_zeros, plain):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
  assert max(np.abs(a - b).max() for a, b in zip(sam, plain)) > 1e-4  # rho matters.


# ---- SSAM-D ------------------------------------------------------------------------------
def test_random_masks_have_the_seed_live_count_and_follow_the_seed():
  shapes = [(3, 3, 2, 4), (7,), (10, 3)]  # N = 109.
  variables = _variables(shapes)
  masks = ssam.random_masks(variables, 0.3, tf.constant([1, 2]))
  assert [tuple(m.shape) for m in masks] == shapes
  live = sum(m.numpy().sum() for m in masks)
  assert live == 109 - math.ceil(109 * 0.3)
  assert float(ssam.mask_lived_weight(masks)) == pytest.approx(live / 109)
  again = ssam.random_masks(variables, 0.3, tf.constant([1, 2]))
  other = ssam.random_masks(variables, 0.3, tf.constant([1, 3]))
  assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(masks, again))
  assert not all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(masks, other))


def test_dynamic_update_drops_and_grows_the_hand_computed_entries():
  masks = [tf.constant([1.0, 1.0, 1.0, 0.0]), tf.constant([[1.0, 0.0], [0.0, 1.0]])]
  grads = [tf.constant([0.3, -0.1, 0.5, 0.2]), tf.constant([[0.8, -0.9], [0.4, 0.05]])]
  weights = [tf.constant([-2.0, 0.5, 1.0, 3.0]), tf.constant([[0.1, 0.2], [-0.7, 0.6]])]
  common = dict(epochs=10, sparsity=0.5, drop_rate=0.5, seed=tf.constant([0, 7]))
  # N = 8, 5 live; epoch 0: dr = 0.5, death_num = int(min(5 * 0.5, 8 * 0.5)) = 2.
  # Death by |grad| among the live (0.3, 0.1, 0.5, 0.8, 0.05): drop 0.1 and 0.05.
  # Growth by |w| among the dead (3.0, 0.2, 0.7): revive 3.0 and -0.7.
  new = ssam.dynamic_update(masks, grads, weights, epoch=0, drop_strategy="gradient",
                            growth_strategy="weight", **common)
  np.testing.assert_array_equal(new[0].numpy(), [1, 0, 1, 1])
  np.testing.assert_array_equal(new[1].numpy(), [[1, 0], [1, 0]])
  # Death by |w| (2.0, 0.5, 1.0, 0.1, 0.6): drop 0.5 and 0.1; growth by |grad| among
  # the dead (0.2, 0.9, 0.4): revive 0.9 and 0.4.
  new = ssam.dynamic_update(masks, grads, weights, epoch=0, drop_strategy="weight",
                            growth_strategy="gradient", **common)
  np.testing.assert_array_equal(new[0].numpy(), [1, 0, 1, 0])
  np.testing.assert_array_equal(new[1].numpy(), [[0, 1], [1, 1]])
  # Epoch 5 of 10: dr = 0.25, death_num = int(1.25) = 1: only |grad| 0.05 dies.
  new = ssam.dynamic_update(masks, grads, weights, epoch=5, drop_strategy="gradient",
                            growth_strategy="weight", **common)
  np.testing.assert_array_equal(new[0].numpy(), [1, 1, 1, 1])
  np.testing.assert_array_equal(new[1].numpy(), [[1, 0], [0, 0]])
  # At the end of the schedule the drop rate is 0: nothing changes.
  new = ssam.dynamic_update(masks, grads, weights, epoch=10, **common)
  for a, b in zip(new, masks):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_dynamic_update_random_strategies_preserve_the_live_count():
  shapes = [(3, 3, 4, 8), (8,), (32, 10)]
  variables = _variables(shapes)
  rng = np.random.default_rng(4)
  grads = [tf.constant(rng.normal(size=s), tf.float32) for s in shapes]
  masks = ssam.random_masks(variables, 0.5, tf.constant([0, 1]))
  live = sum(m.numpy().sum() for m in masks)
  new = ssam.dynamic_update(masks, grads, variables, epoch=1, epochs=10, sparsity=0.5,
                            drop_strategy="random", growth_strategy="random",
                            seed=tf.constant([3, 3]))
  old_flat = np.concatenate([m.numpy().ravel() for m in masks])
  new_flat = np.concatenate([m.numpy().ravel() for m in new])
  assert new_flat.sum() == live
  rate = 0.5 * (1 + math.cos(math.pi * 0.1)) / 2
  death_num = int(min(live * rate, old_flat.size * 0.5))
  assert ((old_flat == 1) & (new_flat == 0)).sum() == death_num
  assert ((old_flat == 0) & (new_flat == 1)).sum() == death_num


def test_mask_lived_weight_is_the_fraction_of_ones():
  masks = [tf.constant([[1.0, 0.0], [1.0, 1.0]]), tf.zeros([4])]
  assert float(ssam.mask_lived_weight(masks)) == pytest.approx(3 / 8)


# ---- bad input ---------------------------------------------------------------------------
def test_bad_input_raises_value_errors_naming_the_flags():
  variables = _variables([(4, 2)])
  scores = [tf.ones([4, 2])]

  def masks(**kwargs):
    return ssam.fisher_masks(scores, variables, **dict(dict(sparsity=0.5), **kwargs))

  for sparsity in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"--sparsity must be in \[0, 1\)"):
      masks(pattern="unstructured", sparsity=sparsity)
  with pytest.raises(ValueError, match="--pattern must be one of"):
    masks(pattern="blocks")
  with pytest.raises(ValueError, match="--n_structured and --m_structured"):
    masks(pattern="nm", m=4)
  with pytest.raises(ValueError, match="--n_structured must be <= --m_structured"):
    masks(pattern="nm", n=3, m=2)
  with pytest.raises(ValueError, match="--m_structured=3 does not divide the size 8"):
    masks(pattern="nm", n=1, m=3)
  with pytest.raises(ValueError, match="--nm_conv_layout must be one of"):
    masks(pattern="nm", n=1, m=2, nm_conv_layout="pytorch")
  with pytest.raises(ValueError, match="--sparsity"):
    ssam.random_masks(variables, 1.0, tf.constant([0, 0]))
  update = dict(epoch=0, epochs=10, sparsity=0.5, seed=tf.constant([0, 0]))
  with pytest.raises(ValueError, match="--drop_strategy must be one of"):
    ssam.dynamic_update(scores, scores, variables, drop_strategy="magnitude", **update)
  with pytest.raises(ValueError, match="--growth_strategy must be one of"):
    ssam.dynamic_update(scores, scores, variables, growth_strategy="momentum", **update)
  with pytest.raises(ValueError, match=r"--drop_rate must be in \[0, 1\]"):
    ssam.dynamic_update(scores, scores, variables, drop_rate=1.5, **update)
  with pytest.raises(ValueError, match="--epochs must be > 0"):
    ssam.dynamic_update(scores, scores, variables, **dict(update, epochs=0))


# ---- implicit sparse perturbation --------------------------------------------------------
def _random(shape, seed):
  return tf.constant(np.random.default_rng(seed).normal(size=shape), tf.float32)


@pytest.mark.parametrize("x_shape", [(4, 6), (2, 3, 6)])
def test_implicit_dense_masks_only_the_input_gradient(x_shape):
  x = _random(x_shape, 0)
  kernel = tf.Variable(_random((6, 5), 1))
  mask = tf.constant(np.random.default_rng(2).random((6, 5)) < 0.5, tf.float32)
  dy = _random(x_shape[:-1] + (5,), 3)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = implicit_ops.implicit_dense(x, kernel, mask)
  dx, dk = tape.gradient(y, [x, kernel], output_gradients=dy)
  np.testing.assert_array_equal(y.numpy(), tf.matmul(x, kernel).numpy())
  k, m = kernel.numpy(), mask.numpy()
  np.testing.assert_allclose(dx.numpy(), dy.numpy() @ (k * m).T, atol=1e-5)
  np.testing.assert_allclose(dk.numpy(), x.numpy().reshape(-1, 6).T @ dy.numpy().reshape(-1, 5),
                             atol=1e-5)
  assert np.abs(dx.numpy() - dy.numpy() @ k.T).max() > 1e-3  # The mask matters.


def _dilated_conv_input_gradient_supported():
  """Whether this TensorFlow build computes a dilated conv's input gradient on this device.

  TensorFlow's own CPU kernel refuses dilation rates above 1; its oneDNN kernel,
  on by default only on some x86 CPUs (`TF_ENABLE_ONEDNN_OPTS`), computes them.
  """
  x = tf.ones((1, 5, 5, 1))
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = tf.nn.conv2d(x, tf.ones((3, 3, 1, 1)), 1, "VALID", dilations=2)
  try:
    tape.gradient(y, x)
  except tf.errors.InvalidArgumentError:
    return False
  return True


@pytest.mark.parametrize("strides,padding,dilations", [
    (1, "SAME", 1), (2, "same", 1), (2, "VALID", 1), (1, "VALID", 2)])
def test_implicit_conv2d_masks_only_the_input_gradient(strides, padding, dilations):
  x = _random((2, 7, 7, 3), 0)
  kernel = tf.Variable(_random((3, 3, 3, 4), 1))
  mask = tf.constant(np.random.default_rng(2).random((3, 3, 3, 4)) < 0.5, tf.float32)

  def conv(inputs, k):
    return tf.nn.conv2d(inputs, k, strides, padding.upper(), dilations=dilations)

  dense_out = conv(x, kernel)
  dy = _random(tuple(dense_out.shape), 3)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = implicit_ops.implicit_conv2d(x, kernel, mask, strides, padding, dilations)
  if dilations > 1 and not _dilated_conv_input_gradient_supported():
    # Where TensorFlow's conv refuses, the implicit op refuses alike (no wrong numbers).
    with pytest.raises(tf.errors.InvalidArgumentError, match="dilation"):
      tape.gradient(y, [x, kernel], output_gradients=dy)
    np.testing.assert_array_equal(y.numpy(), dense_out.numpy())
    return
  dx, dk = tape.gradient(y, [x, kernel], output_gradients=dy)
  np.testing.assert_array_equal(y.numpy(), dense_out.numpy())
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    masked_out, plain_out = conv(x, kernel * mask), conv(x, kernel)
  dx_ref = tape.gradient(masked_out, x, output_gradients=dy)
  dk_ref = tape.gradient(plain_out, kernel, output_gradients=dy)
  np.testing.assert_allclose(dx.numpy(), dx_ref.numpy(), atol=1e-5)
  np.testing.assert_allclose(dk.numpy(), dk_ref.numpy(), atol=1e-5)
  assert np.abs(dx.numpy() - tape.gradient(plain_out, x, output_gradients=dy).numpy()).max() > 1e-3
