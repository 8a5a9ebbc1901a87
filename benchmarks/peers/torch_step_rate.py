"""Training steps per second of a zoo model's PyTorch counterpart, in eager PyTorch.

The peer of `benchmarks/bench_models.py`: the model of `torch_models.py`,
the same optimizer and batch size as the toolkit's row, trained on real
batches (CIFAR-10's first `--examples` training images, or MNIST's training
split) drawn by `randperm`, as a PyTorch user writes it. Step kinds, each
the same algorithm as the toolkit's step of that name:

- natural: cross-entropy, backward, optimizer step;
- pgd10: adversarial training as the engine does it (`steps.adversarial`):
  the model's own predictions as labels (the toolkit's default
  `--attack_labels=predicted`), `--pgd_steps` L-inf PGD steps from a random
  start with the model in eval mode, then one training pass over the clean
  and adversarial halves, loss `(1 - mix) CE(x) + mix CE(x_adv)`;
- sam: SAM (rho `--rho`): gradient at w, `e = rho g / ||g||`, gradient at
  w + e, the base optimizer's step at w (davda54/sam's two passes; its
  second pass updates the batch-norm statistics too, which costs no FLOP).

FLOPs per step of each kind are counted by `torch.utils.flop_counter.
FlopCounterMode` (matrix products, convolutions and attention, forward and
backward; elementwise work and the optimizer are not counted) on a copy of
the model on the meta device, so counting costs no arithmetic. torch uses
its default number of threads.

  python -m benchmarks.peers.torch_step_rate --data_dir=DIR --model=resnet18 \\
      [--dataset=cifar10 --batch_size=128 --kinds=natural,pgd10,sam --optimizer=sgd \\
       --learning_rate=0.01 --momentum=0.9 --weight_decay=5e-4 --warmup=2 --steps=3 \\
       --repeats=1]

prints one JSON line: `steps_per_second` and `first_seconds` (the warm-up
steps' wall time) per kind (the median of `--repeats` chunks of `--steps`
steps, the kinds interleaved round-robin), `flops` per step of each kind,
`parameters` (trainable), `threads`, `torch`.

With `--serve` it prints the JSON line without timing anything (steps/s
absent) and then serves its caller, who times it beside its own work: each
line `{"kind": K, "steps": N}` read from stdin runs N steps of kind K and
answers `{"seconds": S}`; end of input ends it.
"""

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.peers import common, torch_models

KINDS = ("natural", "pgd10", "sam")
INPUT_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def natural_gradients(model, x, y, args):
  del args
  F.cross_entropy(model(x), y).backward()


def pgd(model, x, labels, eps, step_size, steps):
  """L-inf PGD from a random start, model in eval mode (restored to train mode after)."""
  model.eval()
  delta = torch.empty_like(x).uniform_(-eps, eps)
  for _ in range(steps):
    delta.requires_grad_(True)
    loss = F.cross_entropy(model((x + delta).clamp(0.0, 1.0)), labels)
    grad, = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
  model.train()
  return (x + delta).clamp(0.0, 1.0)


def pgd_gradients(model, x, y, args):
  model.eval()
  with torch.no_grad():
    predicted = model(x).argmax(1)
  x_adv = pgd(model, x, predicted, args.eps, args.pgd_step_size, args.pgd_steps)
  natural, adversarial = model(torch.cat([x, x_adv])).split(len(x))
  loss = ((1.0 - args.adv_mix) * F.cross_entropy(natural, y)
          + args.adv_mix * F.cross_entropy(adversarial, y))
  loss.backward()


def sam_gradients(model, x, y, args):
  F.cross_entropy(model(x), y).backward()
  params = [p for p in model.parameters() if p.grad is not None]
  with torch.no_grad():
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                 for p in params]))
    scale = args.rho / (norm + 1e-12)
    perturbations = [p.grad * scale for p in params]
    torch._foreach_add_(params, perturbations)  # w + e
  for p in params:
    p.grad = None
  F.cross_entropy(model(x), y).backward()
  with torch.no_grad():
    torch._foreach_sub_(params, perturbations)  # Back to w for the base step.


GRADIENTS = {"natural": natural_gradients, "pgd10": pgd_gradients, "sam": sam_gradients}


def make_optimizer(model, args):
  if args.optimizer == "sgd":
    return torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                           weight_decay=args.weight_decay)
  return torch.optim.Adam(model.parameters(), lr=args.learning_rate,
                          weight_decay=args.weight_decay)


def count_flops(model, kind, input_shape, batch_size, num_classes, args):
  """FLOPs of one `kind` step's forward and backward passes (meta device: nothing computed)."""
  meta = copy.deepcopy(model).to("meta")
  height, width, channels = input_shape
  x = torch.rand(batch_size, channels, height, width, device="meta")
  y = torch.randint(0, num_classes, (batch_size,), device="meta")
  counter = FlopCounterMode(display=False)
  with counter:
    GRADIENTS[kind](meta, x, y, args)
  return counter.get_total_flops()


def load(args):
  """(images [n, C, H, W], labels [n]) of the training set asked for."""
  if args.dataset == "mnist":
    x, y = common.load_mnist(args.data_dir)["train"]
    return x.reshape(-1, 1, 28, 28)[:args.examples], y[:args.examples]
  return common.load_cifar10_train(args.data_dir, args.examples)


def arguments():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="folder with mnist/ and cifar-10/")
  parser.add_argument("--model", required=True, choices=sorted(torch_models.BUILDERS))
  parser.add_argument("--dataset", default="cifar10", choices=sorted(INPUT_SHAPES))
  parser.add_argument("--examples", type=int, default=None,
                      help="train on the first N training images (default: all)")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--kinds", default="natural", help=f"comma-separated: {', '.join(KINDS)}")
  parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
  parser.add_argument("--learning_rate", type=float, default=0.01)
  parser.add_argument("--momentum", type=float, default=0.9)
  parser.add_argument("--weight_decay", type=float, default=0.0)
  parser.add_argument("--eps", type=float, default=8 / 255)
  parser.add_argument("--pgd_step_size", type=float, default=2 / 255)
  parser.add_argument("--pgd_steps", type=int, default=10)
  parser.add_argument("--adv_mix", type=float, default=0.5)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per kind first")
  parser.add_argument("--steps", type=int, default=3, help="steps per timed chunk")
  parser.add_argument("--repeats", type=int, default=1, help="timed chunks per kind")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--serve", action="store_true",
                      help="time nothing; run the steps that stdin asks for (see the docstring)")
  args = parser.parse_args()
  args.kinds = args.kinds.split(",")
  unknown = sorted(set(args.kinds) - set(KINDS))
  if unknown:
    parser.error(f"unknown --kinds {', '.join(unknown)}; known: {', '.join(KINDS)}")
  return args


def main():
  args = arguments()
  torch.manual_seed(args.seed)
  x, y = load(args)
  num_classes = 10
  input_shape = INPUT_SHAPES[args.dataset]
  model = torch_models.build(args.model, input_shape, num_classes)
  model.train()
  optimizer = make_optimizer(model, args)
  batches = common.batches(x, y, args.batch_size, None, args.seed)

  def run(kind, steps):
    gradients = GRADIENTS[kind]
    start = time.perf_counter()
    for _ in range(steps):
      images, labels = next(batches)
      optimizer.zero_grad(set_to_none=True)
      gradients(model, images, labels, args)
      optimizer.step()
    return time.perf_counter() - start

  result = {
      "model": args.model, "batch_size": args.batch_size, "torch": torch.__version__,
      "threads": torch.get_num_threads(), "parameters": torch_models.trainable_count(model),
      "flops": {kind: count_flops(model, kind, input_shape, args.batch_size, num_classes, args)
                for kind in args.kinds},
  }
  if args.serve:
    print(json.dumps(result), flush=True)
    for line in sys.stdin:
      if not line.strip():
        continue
      request = json.loads(line)
      seconds = run(request["kind"], int(request["steps"]))
      print(json.dumps({"seconds": seconds}), flush=True)
    return
  result["first_seconds"] = {kind: run(kind, args.warmup) for kind in args.kinds}
  times = {kind: [] for kind in args.kinds}
  for _ in range(args.repeats):
    for kind in args.kinds:
      times[kind].append(run(kind, args.steps))
  result["steps_per_second"] = {kind: args.steps / statistics.median(t)
                                for kind, t in times.items()}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
