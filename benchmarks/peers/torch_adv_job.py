"""PGD-10 adversarial training of dense-300-100 on MNIST in eager PyTorch with torchattacks.

The peer of

  python -m run_experiments --dataset=digits --model=dense-300-100 --experiment=train \\
      --trials=1 --train_iters=1000 --eval_every=1000 --attack=pgd --adv_train \\
      --sharpness_examples=0

1000 iterations of batch 60, Adam (lr 0.0012), label smoothing 0.1, PGD eps
0.3, step 0.05, 10 steps from a random start (`torchattacks.PGD`), the loss
half natural, half adversarial (one pass over both halves); natural and PGD
evaluation of the validation and test sets before and after training. Written
as a PyTorch user writes it: an eager loop, in-memory batches by `randperm`.

  python -m benchmarks.peers.torch_adv_job --data_dir=DIR
"""

import time

START = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchattacks  # noqa: E402

from benchmarks.peers import common  # noqa: E402


def pgd(model):
  return torchattacks.PGD(model, eps=0.3, alpha=0.05, steps=10, random_start=True)


def train_step(model, optimizer, attack, images, labels):
  with torch.no_grad():
    predicted = model(images).argmax(1)
  adversarial = attack(images, predicted)  # torchattacks puts the model in eval mode.
  logits = model(torch.cat([images, adversarial]))
  loss = F.cross_entropy(logits, torch.cat([labels, labels]), label_smoothing=0.1)
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()


def main():
  common.run_job(__doc__.splitlines()[0], START, 1000, pgd, train_step)


if __name__ == "__main__":
  main()
