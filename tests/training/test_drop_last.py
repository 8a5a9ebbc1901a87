"""--drop_last: floor(n / B) full batches per epoch (PyTorch's drop_last=True, SSAM's loader)."""

import numpy as np
import tensorflow as tf

from robust_sparse.core.hparams import Hparams
from tests.training.test_engine import _counting_engine


def test_an_epoch_is_its_permutations_full_batches(digits):
  n = len(digits.x_train)  # 1137 = 35 * 32 + 17.
  engine, seen, sizes = _counting_engine(digits, "graph")
  engine.reset(0)
  stream = engine.batches(seed=4, drop_last=True)
  assert stream.per_epoch == 35 and not stream.smaller_last
  engine.train(stream, 35)
  counts = seen.numpy()
  assert counts.sum() == 35 * 32 and set(np.unique(counts)) == {0, 1}  # Each at most once.
  assert sizes.numpy()[32] == 35 and sizes.numpy().sum() == 35
  # The same examples as the first 35 batches of the whole-epoch order: its last 17 dropped.
  full = engine.batches(seed=4)
  first = np.concatenate([next(full.full).numpy() for _ in range(35)])
  np.testing.assert_array_equal(np.flatnonzero(counts), np.sort(first))
  # Epoch 2 is a new permutation, again each example at most once; resuming mid-epoch
  # continues with the same batches.
  seen.assign(tf.zeros_like(seen))
  engine.train(stream, 35)
  second = seen.numpy()
  assert second.sum() == 35 * 32 and second.max() == 1
  assert not np.array_equal(second, counts)
  seen.assign(tf.zeros_like(seen))
  engine.reset(0, iteration=40)
  engine.train(engine.batches(seed=4, start_iteration=40, drop_last=True), 30)
  resumed = seen.numpy()
  assert resumed.sum() == 30 * 32 and set(np.flatnonzero(resumed)) <= set(np.flatnonzero(second))


def test_steps_per_epoch_and_ssams_seed_default():
  assert Hparams(batch_size=32).steps_per_epoch(1137) == 36
  assert Hparams(batch_size=32, drop_last=True).steps_per_epoch(1137) == 35
  assert Hparams(batch_size=32, drop_last=True, epochs=2.0).total_iterations(1137) == 70
  assert Hparams.with_seed_defaults(optimizer="ssamf-sgd").drop_last
  assert not Hparams.with_seed_defaults(optimizer="ssamf-sgd", drop_last=False).drop_last
  assert not Hparams.with_seed_defaults(optimizer="sgd").drop_last
