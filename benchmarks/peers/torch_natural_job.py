"""Natural training of dense-300-100 on MNIST in eager PyTorch, then an FGSM evaluation.

The peer of the natural seed job

  python -m run_experiments --dataset=digits --model=dense-300-100 --experiment=train \\
      --trials=1 --train_iters=5000 --eval_every=5000 --attack=fgsm --sharpness_examples=0

5000 iterations of batch 60, Adam (lr 0.0012), label smoothing 0.1; natural
and FGSM (eps 0.3, written in torch) evaluation of the validation and test
sets before and after training, as the toolkit evaluates them. An eager loop,
in-memory batches by `randperm`.

  python -m benchmarks.peers.torch_natural_job --data_dir=DIR
"""

import time

START = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.peers import common  # noqa: E402

EPS = 0.3


def fgsm(model):
  """`attack(images, labels)`: one signed-gradient step of size EPS, clipped to [0, 1]."""

  def attack(images, labels):
    images = images.clone().requires_grad_(True)
    loss = F.cross_entropy(model(images), labels)
    grad, = torch.autograd.grad(loss, images)
    return (images + EPS * grad.sign()).clamp(0.0, 1.0).detach()

  return attack


def train_step(model, optimizer, attack, images, labels):
  del attack  # Natural training.
  loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()


def main():
  common.run_job(__doc__.splitlines()[0], START, 5000, fgsm, train_step)


if __name__ == "__main__":
  main()
