"""Fidelity of the data order: the batches an `--epochs` run trains on, epoch by epoch.

The engine trains a small model (learning rate 0) whose loss function records
the indices of every row of every batch it is given, as the compiled step sees
them, through several epochs, with stops anywhere (an epoch's last batch
included) and a resume from a fresh `Engine.batches`. The reference is
PyTorch's `DataLoader(shuffle=True, drop_last=False)` on the same per-epoch
permutations: each epoch's permutation cut in order into ceil(n / B) batches,
the last one of the n mod B left. A NumPy re-derivation of its `BatchSampler`
runs here (and in the tests), torch's own `BatchSampler` in the peers' process.
The permutations themselves are the toolkit's seeded shuffle (the randomness,
not the batching, is the toolkit's own); the reference checks that each is one.
"""

import numpy as np

from benchmarks.fidelity import Check

NUM_EXAMPLES, BATCH = 203, 16  # 13 batches per epoch, the last of 11.
STOPS = (5, 7, 1, 9, 8)  # Train calls: stops at an epoch's last batch and right after it.
RESUME_AT = 20


def _recorded_batches(context, mode, drop_last=False):
  """The rows and batch sizes the engine's step trained on, in order (`drop_last`: the
  engine's `--drop_last` batches)."""
  import tensorflow as tf
  import keras
  from robust_sparse.training.engine import Engine, batches_per_epoch, epoch_permutation
  from robust_sparse.training.optimizers import make_optimizer
  from robust_sparse.training.steps import OptimizerGroup, standard_loss_grad_fn

  n, seed = NUM_EXAMPLES, context.seed + 11
  steps = sum(STOPS)
  # Image i holds i everywhere: the step reads back which example it got.
  x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None], (n, 4)).copy()
  y = np.random.default_rng(context.seed).integers(0, 3, n).astype(np.int32)
  keras.utils.set_random_seed(context.seed)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="classifier")])
  rows = tf.Variable(tf.fill([steps * BATCH], -1), trainable=False)
  sizes = tf.Variable(tf.zeros([steps], tf.int32), trainable=False)
  cursor = tf.Variable([0, 0], trainable=False)  # (rows written, steps taken)
  standard = standard_loss_grad_fn(model, num_classes=3)

  def recording(trainable, non_trainable, batch):
    ids = tf.cast(tf.round(batch["x"][:, 0]), tf.int32)
    size = tf.shape(ids)[0]
    rows.scatter_update(tf.IndexedSlices(ids, cursor[0] + tf.range(size)))
    sizes.scatter_update(tf.IndexedSlices(size[None], cursor[1:]))
    cursor.assign_add(tf.stack([size, 1]))
    return standard(trainable, non_trainable, batch)

  engine = Engine(model, recording, [OptimizerGroup("weights", make_optimizer("sgd", 0.0))],
                  x_train=x, y_train=y, batch_size=BATCH, attack=None, compile=mode)
  engine.reset(0)
  stream, done = engine.batches(seed, drop_last=drop_last), 0
  for count in STOPS:
    if done == RESUME_AT:  # A killed run resumes with a fresh stream at its iteration.
      stream = engine.batches(seed, done, drop_last=drop_last)
    engine.train(stream, count)
    done += count
  written = int(cursor.numpy()[0])
  per_epoch = n // BATCH if drop_last else batches_per_epoch(n, BATCH)[0]
  epochs = -(-steps // per_epoch)
  permutations = np.stack([epoch_permutation(n, seed, e).numpy() for e in range(epochs)])
  inputs = {"permutations": permutations, "batch_size": np.array(BATCH),
            "steps": np.array(steps), "drop_last": np.array(drop_last)}
  return inputs, {"rows": rows.numpy()[:written], "sizes": sizes.numpy()}


def dataloader_batches(inputs):
  """NumPy re-derivation of PyTorch's BatchSampler(sampler, B, drop_last) per epoch."""
  permutations = inputs["permutations"]
  size, steps = int(inputs["batch_size"]), int(inputs["steps"])
  drop_last = bool(inputs.get("drop_last", False))
  n = permutations.shape[1]
  batches = []
  for order in permutations:
    if not np.array_equal(np.sort(order), np.arange(n)):
      raise ValueError("an epoch's order is not a permutation of the training set")
    end = n - n % size if drop_last else n
    batches += [order[start:start + size] for start in range(0, end, size)]
  batches = batches[:steps]
  return {"rows": np.concatenate(batches), "sizes": np.array([len(b) for b in batches])}


CHECKS = [
    Check(name="epoch data order: every example once, last batch smaller (XLA loop, resumed)",
          reference="NumPy re-derivation of torch DataLoader(drop_last=False) batches",
          tolerance=0.5, ours=lambda context: _recorded_batches(context, "xla_loop"),
          numpy_reference=dataloader_batches),
    Check(name="epoch data order: every example once, last batch smaller (graph step)",
          reference="NumPy re-derivation of torch DataLoader(drop_last=False) batches",
          tolerance=0.5, ours=lambda context: _recorded_batches(context, "graph"),
          numpy_reference=dataloader_batches),
    Check(name="epoch data order: batches vs torch's BatchSampler",
          reference="torch.utils.data.BatchSampler(drop_last=False) over the permutations",
          tolerance=0.5, ours=lambda context: _recorded_batches(context, "xla_loop"),
          peer="benchmarks.peers.fidelity_data_order:batch_sampler"),
    Check(name="epoch data order with --drop_last: full batches only (graph step, resumed)",
          reference="NumPy re-derivation of torch DataLoader(drop_last=True) batches",
          tolerance=0.5, ours=lambda context: _recorded_batches(context, "graph", True),
          numpy_reference=dataloader_batches),
    Check(name="epoch data order with --drop_last: batches vs torch's BatchSampler",
          reference="torch.utils.data.BatchSampler(drop_last=True) over the permutations",
          tolerance=0.5, ours=lambda context: _recorded_batches(context, "xla_loop", True),
          peer="benchmarks.peers.fidelity_data_order:batch_sampler"),
]
