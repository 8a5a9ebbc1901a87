"""The named random streams of a run: which draw a stateless seed belongs to.

`robust_sparse.training.steps.stream_seed(seed, iteration, stream, index)`
makes every random draw of a run a pure function of the run seed, the
iteration, the stream and an index. The streams keep the integer values they
had when they were bare numbers, so every draw (hence every result) is the
same. Pure Python: no TensorFlow.
"""

import enum


class Stream(enum.IntEnum):
  """What a stateless seed is drawn for."""
  TRAIN_ATTACK = 0       # The adversarial example of a training step.
  VALID_ATTACK = 1       # The attacks of the validation set's evaluation.
  TEST_ATTACK = 2        # The attacks of the test set's evaluation.
  AUGMENT = 3            # A training batch's augmentation.
  TRAIN_PREPARE = 4      # A training batch's preparation (random crops of resized images, ...).
  VALID_PREPARE = 5      # A validation batch's preparation.
  TEST_PREPARE = 6       # A test batch's preparation.
  FIXED_SET_PREPARE = 7  # The preparation of a fixed set of images (the sharpness set).


# An evaluated split's batches are prepared on its attack stream + this offset
# (VALID_ATTACK -> VALID_PREPARE, TEST_ATTACK -> TEST_PREPARE).
PREPARE_OFFSET = Stream.VALID_PREPARE - Stream.VALID_ATTACK
