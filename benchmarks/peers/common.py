"""What both PyTorch peers share: MNIST from the IDX files, the network, evaluation.

numpy reads the official `.gz` files of `<data_dir>/mnist/`; the first 10000
training images validate and the other 50000 train, as `--dataset=digits`
does. The network is the toolkit's dense-300-100 (784-300-100-10, ReLU, no
biases). Labels of the attacks are the model's own predictions on the clean
images (the toolkit's default `--attack_labels=predicted`).

For the step-rate peer (`torch_step_rate.py`), `load_cifar10_train` reads
the training records of the binary CIFAR-10 (`<data_dir>/cifar-10/
cifar-10-batches-bin/`).
"""

import argparse
import gzip
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

VALID_SIZE = 10000


def read_idx(path):
  """A uint8 array from an IDX file (gzip-compressed)."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(data_dir):
  """{train, valid, test}: (images float32 [n, 784] in [0, 1], labels int64 [n]) tensors."""
  folder = os.path.join(data_dir, "mnist")

  def split(prefix):
    images = read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
    return (torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0),
            torch.from_numpy(labels.astype(np.int64)))

  x, y = split("train")
  x_test, y_test = split("t10k")
  return {"train": (x[VALID_SIZE:], y[VALID_SIZE:]), "valid": (x[:VALID_SIZE], y[:VALID_SIZE]),
          "test": (x_test, y_test)}


CIFAR10_RECORD = 1 + 3 * 32 * 32  # A label byte, then the R, G, B planes of 32x32.


def load_cifar10_train(data_dir, examples=None):
  """The first `examples` (all: None) CIFAR-10 training images, in file order.

  Returns:
    (images float32 [n, 3, 32, 32] in [0, 1], labels int64 [n]) tensors.
  """
  folder = os.path.join(data_dir, "cifar-10", "cifar-10-batches-bin")
  records = []
  for index in range(1, 6):
    with open(os.path.join(folder, f"data_batch_{index}.bin"), "rb") as f:
      data = np.frombuffer(f.read(), np.uint8)
    records.append(data.reshape(-1, CIFAR10_RECORD))
    if examples is not None and sum(len(r) for r in records) >= examples:
      break
  records = np.concatenate(records)[:examples]
  images = records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
  return torch.from_numpy(images), torch.from_numpy(records[:, 0].astype(np.int64))


def dense_300_100():
  return torch.nn.Sequential(
      torch.nn.Linear(784, 300, bias=False), torch.nn.ReLU(),
      torch.nn.Linear(300, 100, bias=False), torch.nn.ReLU(),
      torch.nn.Linear(100, 10, bias=False))


def batches(x, y, batch_size, iterations, seed=0):
  """`iterations` shuffled training batches, epoch after epoch (last partial batch dropped)."""
  generator = torch.Generator().manual_seed(seed)
  done = 0
  while True:
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x) - batch_size + 1, batch_size):
      if done == iterations:
        return
      index = order[start:start + batch_size]
      yield x[index], y[index]
      done += 1


def evaluate(model, attack, x, y, batch_size=1000):
  """Natural and adversarial loss and accuracy; `attack(images, labels) -> images`."""
  model.eval()
  sums = np.zeros(4)
  for start in range(0, len(x), batch_size):
    images, labels = x[start:start + batch_size], y[start:start + batch_size]
    with torch.no_grad():
      logits = model(images)
    predicted = logits.argmax(1)
    adversarial = attack(images, predicted)
    with torch.no_grad():
      adv_logits = model(adversarial)
    sums += [F.cross_entropy(logits, labels, reduction="sum").item(),
             (predicted == labels).sum().item(),
             F.cross_entropy(adv_logits, labels, reduction="sum").item(),
             (adv_logits.argmax(1) == labels).sum().item()]
  model.train()
  loss, acc, adv_loss, adv_acc = sums / len(x)
  return {"loss": loss, "acc": acc, "adv_loss": adv_loss, "adv_acc": adv_acc}


def evaluate_splits(model, attack, data, when, log):
  for split in ("valid", "test"):
    result = evaluate(model, attack, *data[split])
    log(f"{when} {split}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))


def arguments(description):
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--data_dir", required=True, help="folder with mnist/ (IDX .gz files)")
  parser.add_argument("--seed", type=int, default=0)
  return parser


class Clock:
  """Wall-time marks since `start` (the time the script began importing)."""

  def __init__(self, start):
    self.start = start
    self.last = start
    self.marks = []

  def mark(self, name):
    now = time.perf_counter()
    self.marks.append(f"{name} {now - self.last:.2f}")
    self.last = now

  def summary(self):
    return "peer phases (s): " + ", ".join(self.marks)


def run_job(description, start, iterations, make_attack, train_step):
  """The job both peers run, as the toolkit's runner does: seed, data, dense-300-100 with
  Adam (lr 0.0012), evaluation of validation and test before and after `iterations`
  training steps of batch 60, the phases' wall times last.

  Args:
    description: the command's help.
    start: `time.perf_counter()` when the script began importing.
    iterations: the default of `--iterations`.
    make_attack: `make_attack(model) -> attack(images, labels) -> images`.
    train_step: `train_step(model, optimizer, attack, images, labels)`: one update.
  """
  parser = arguments(description)
  parser.add_argument("--iterations", type=int, default=iterations)
  args = parser.parse_args()
  clock = Clock(start)
  clock.mark("import")
  torch.manual_seed(args.seed)
  data = load_mnist(args.data_dir)
  clock.mark("data")
  model = dense_300_100()
  optimizer = torch.optim.Adam(model.parameters(), lr=0.0012)
  attack = make_attack(model)
  evaluate_splits(model, attack, data, "before", print)
  clock.mark("eval")
  model.train()
  for images, labels in batches(*data["train"], 60, args.iterations, args.seed):
    train_step(model, optimizer, attack, images, labels)
  clock.mark("train")
  evaluate_splits(model, attack, data, "after", print)
  clock.mark("eval")
  print(clock.summary())
