"""Compiled training and evaluation with optional adversarial training.

`Trainer` owns the model's optimizer and runs chunks of training iterations
inside one `tf.function` (no Python per step), drawing batch indices from a
`tf.data` stream whose order is a pure function of the seed and the iteration.
Together with stateless attack randomness this makes a run resumable: restoring
the variables at iteration `i` and continuing gives the same numbers as never
stopping.
"""

from typing import Callable, Dict, Optional

import numpy as np
import tensorflow as tf
import keras

METRICS = ("loss", "acc", "adv_acc", "nat_loss", "adv_loss")


def index_stream(num_examples: int, batch_size: int, seed: int, start_iteration: int = 0):
  """Batches of training indices: epoch e is a permutation seeded by (seed, e).

  Epochs are concatenated and cut into full batches, so batch `i` always holds
  the same indices however the stream was started; `start_iteration` skips to it.
  """
  start = start_iteration * batch_size
  first_epoch, offset = divmod(start, num_examples)

  def permutation(epoch):
    return tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int32),
        seed=tf.stack([tf.cast(seed, tf.int64), epoch]))

  return (tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
          .map(permutation).unbatch().skip(offset)
          .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def supports_xla(model) -> bool:
  """False when any layer says it has no XLA kernel (e.g. the compiled JSReLU op)."""
  return all(getattr(layer, "supports_jit", True)
             for layer in model._flatten_layers(include_self=True))


class Trainer:
  """Trains `model` on in-memory data with Adam, optionally adversarially.

  The training objective is `(1 - adv_mix) * CE(x) + adv_mix * CE(x_adv)` with
  adversarial training, else `CE(x)`, plus the model's regularisation losses.
  Training labels may be label-smoothed (the seed smooths by 0.1); evaluation
  losses use the plain labels.
  """

  def __init__(self, model: keras.Model, attack: Callable, x_train: np.ndarray,
               y_train: np.ndarray, *, num_classes: int, learning_rate: float,
               batch_size: int, adv_train: bool, adv_mix: float = 0.5,
               label_smoothing: float = 0.0, seed: int = 0,
               jit_compile: Optional[bool] = None, eval_batch_size: int = 1000):
    self.model = model
    self.attack = attack
    self.num_classes = num_classes
    self.batch_size = batch_size
    self.adv_train = adv_train
    self.adv_mix = adv_mix
    self.label_smoothing = label_smoothing
    # A variable, not a constant, so that one compiled trainer serves many runs.
    self.seed = tf.Variable(seed, dtype=tf.int64, trainable=False)
    self.eval_batch_size = eval_batch_size
    self.x_train = tf.constant(x_train)
    self.y_train = tf.constant(y_train, dtype=tf.int32)
    self.optimizer = keras.optimizers.Adam(learning_rate)
    self.optimizer.build(model.trainable_variables)
    self.iteration = tf.Variable(0, dtype=tf.int64, trainable=False)
    self._fresh_optimizer = [np.asarray(v.numpy()) for v in self.optimizer.variables]
    if jit_compile is None:
      jit_compile = supports_xla(model)
    self._train_step = tf.function(self._train_step_fn, jit_compile=jit_compile)
    self._eval_batch = tf.function(self._eval_batch_fn, jit_compile=jit_compile)
    self._train_chunk = tf.function(self._train_chunk_fn)
    self._eval_dataset = tf.function(self._eval_dataset_fn)

  def reset(self, seed: int, iteration: int = 0):
    """Starts a new run with the same compiled functions: a fresh optimiser state."""
    for variable, value in zip(self.optimizer.variables, self._fresh_optimizer):
      variable.assign(value)
    self.seed.assign(seed)
    self.iteration.assign(iteration)

  # ---- state, for checkpoints ---------------------------------------------
  def state(self):
    """Every variable a resumed run needs, in a fixed order."""
    return list(self.model.variables) + list(self.optimizer.variables) + [self.iteration]

  def get_state(self):
    return [np.asarray(v.numpy()) for v in self.state()]

  def set_state(self, values):
    variables = self.state()
    if len(values) != len(variables):
      raise ValueError(f"checkpoint has {len(values)} arrays, expected {len(variables)}")
    for variable, value in zip(variables, values):
      variable.assign(value)

  # ---- losses ---------------------------------------------------------------
  def _cross_entropy(self, y, logits, smoothing):
    labels = tf.one_hot(y, self.num_classes)
    if smoothing:
      labels = labels * (1.0 - smoothing) + smoothing / self.num_classes
    return tf.nn.softmax_cross_entropy_with_logits(labels=labels,
                                                   logits=tf.cast(logits, tf.float32))

  def _attack_seed(self, stream, index):
    return tf.stack([self.seed * 4 + stream,
                     self.iteration * 100003 + tf.cast(index, tf.int64)])

  # ---- training ---------------------------------------------------------------
  def _train_step_fn(self, indices):
    x = tf.gather(self.x_train, indices)
    y = tf.gather(self.y_train, indices)
    model = self.model
    if self.adv_train:
      x_adv = self.attack(model, x, None, self._attack_seed(0, 0))
    with tf.GradientTape() as tape:
      if self.adv_train:
        # One forward pass over both halves: faster, and stateful layers (the
        # `mixed` activation's step counter) see one training step, not two.
        logits, adv_logits = tf.split(model(tf.concat([x, x_adv], 0), training=True), 2)
      else:
        logits = model(x, training=True)
      nat_loss = tf.reduce_mean(self._cross_entropy(y, logits, self.label_smoothing))
      if self.adv_train:
        adv_loss = tf.reduce_mean(self._cross_entropy(y, adv_logits, self.label_smoothing))
        loss = (1.0 - self.adv_mix) * nat_loss + self.adv_mix * adv_loss
      else:
        adv_loss = tf.constant(np.nan, tf.float32)
        loss = nat_loss
      objective = loss + tf.add_n([tf.constant(0.0)] + [tf.cast(l, tf.float32)
                                                       for l in model.losses])
    grads = tape.gradient(objective, model.trainable_variables)
    self.optimizer.apply(grads, model.trainable_variables)
    self.iteration.assign_add(1)
    acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y),
                                 tf.float32))
    if self.adv_train:
      adv_acc = tf.reduce_mean(tf.cast(
          tf.equal(tf.argmax(adv_logits, -1, output_type=tf.int32), y), tf.float32))
    else:
      adv_acc = tf.constant(np.nan, tf.float32)
    return tf.stack([loss, acc, adv_acc, nat_loss, adv_loss])

  def _train_chunk_fn(self, iterator, steps):
    sums = tf.zeros([len(METRICS)])
    for _ in tf.range(steps):
      sums += self._train_step(next(iterator))
    return sums

  def train(self, iterator, steps: int) -> Dict[str, float]:
    """Runs `steps` iterations from `iterator`; returns the mean training metrics."""
    sums = self._train_chunk(iterator, tf.constant(steps, tf.int64)).numpy()
    return {name: float(v) / steps for name, v in zip(METRICS, sums)}

  # ---- evaluation --------------------------------------------------------------
  def _eval_batch_fn(self, x, y, index, stream):
    logits = self.model(x, training=False)
    x_adv = self.attack(self.model, x, None, self._attack_seed(stream, index))
    adv_logits = self.model(x_adv, training=False)
    nat_losses = self._cross_entropy(y, logits, 0.0)
    adv_losses = self._cross_entropy(y, adv_logits, 0.0)

    def correct(z):
      return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(z, -1, output_type=tf.int32), y),
                                   tf.float32))

    return tf.stack([tf.reduce_sum(nat_losses), correct(logits), correct(adv_logits),
                     tf.reduce_sum(adv_losses)])

  def _eval_dataset_fn(self, dataset, stream):
    sums = tf.zeros([4])
    for index, (x, y) in dataset.enumerate():
      sums += self._eval_batch(x, y, index, stream)
    return sums

  def evaluate(self, x: np.ndarray, y: np.ndarray, stream: int = 1) -> Dict[str, float]:
    """Natural and adversarial loss and accuracy on all of (x, y).

    Args:
      x, y: the evaluation set.
      stream: distinguishes the attack randomness of different sets (1 valid, 2 test).
    """
    dataset = tf.data.Dataset.from_tensor_slices((x, tf.cast(y, tf.int32))).batch(
        self.eval_batch_size)
    nat_loss, correct, adv_correct, adv_loss = (
        self._eval_dataset(dataset, tf.constant(stream, tf.int64)).numpy() / len(x))
    loss = ((1 - self.adv_mix) * nat_loss + self.adv_mix * adv_loss if self.adv_train
            else nat_loss)
    return {"loss": float(loss), "acc": float(correct), "adv_acc": float(adv_correct),
            "nat_loss": float(nat_loss), "adv_loss": float(adv_loss)}
