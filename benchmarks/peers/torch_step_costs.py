"""Per-step costs of the seeds' protocol models in PyTorch, the field's reference stack.

Used for docs/scaling.md on a GPU machine whose image has PyTorch but no
TensorFlow (so the toolkit's own steps cannot be timed there): one training
step (forward, backward, SGD update) of each seed protocol's model at its
batch size, fp32 (TF32 matmuls allowed, PyTorch's default on Hopper) and with
bf16 autocast, timed with CUDA events after warm-up; PGD-10 adversarial
training steps for the lottery-ticket MLP. Prints one line per protocol and a
JSON line at the end.

  python benchmarks/peers/torch_step_costs.py [--steps=20]
"""

import argparse
import json
import time

import torch
from torch import nn
import torchvision


def cifar_resnet18():
  model = torchvision.models.resnet18(num_classes=10)
  model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
  model.maxpool = nn.Identity()
  return model


def wide_resnet(depth=28, k=10, classes=10):
  n = (depth - 4) // 6
  widths = [16, 16 * k, 32 * k, 64 * k]

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.short = (None if cin == cout and stride == 1
                    else nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
      o = torch.relu(self.bn1(x))
      y = self.conv2(torch.relu(self.bn2(self.conv1(o))))
      return y + (x if self.short is None else self.short(o))

  layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
  cin = widths[0]
  for stage, stride in zip(widths[1:], (1, 2, 2)):
    for i in range(n):
      layers.append(Block(cin, stage, stride if i == 0 else 1))
      cin = stage
  layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
             nn.Linear(cin, classes)]
  return nn.Sequential(*layers)


def mlp():
  return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                       nn.ReLU(), nn.Linear(100, 10))


PROTOCOLS = [
    # name, builder, input shape, batch, adversarial PGD steps
    ("lottery MLP, MNIST, PGD-10 adv. training", mlp, (1, 28, 28), 60, 10),
    ("lottery MLP, MNIST, natural", mlp, (1, 28, 28), 60, 0),
    ("resnet18, CIFAR-10 (SSAM, AutoReP)", cifar_resnet18, (3, 32, 32), 128, 0),
    ("wideresnet28x10, CIFAR-10 (SSAM)", wide_resnet, (3, 32, 32), 128, 0),
    ("vgg16_bn, CIFAR-10 at 32 px (phd-lab)",
     lambda: torchvision.models.vgg16_bn(num_classes=10), (3, 32, 32), 128, 0),
    ("ViT-B/16, 224 px (activation sparsity)",
     lambda: torchvision.models.vit_b_16(num_classes=10), (3, 224, 224), 64, 0),
]


def time_steps(builder, shape, batch, pgd_steps, steps, amp):
  device = "cuda"
  model = builder().to(device)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  x = torch.rand(batch, *shape, device=device)
  y = torch.randint(0, 10, (batch,), device=device)
  loss_fn = nn.CrossEntropyLoss()

  def step():
    inputs = x
    if pgd_steps:
      delta = (torch.rand_like(x) * 2 - 1) * 0.3
      for _ in range(pgd_steps):
        delta.requires_grad_(True)
        loss = loss_fn(model(torch.clamp(x + delta, 0, 1)), y)
        grad, = torch.autograd.grad(loss, delta)
        delta = torch.clamp(delta.detach() + 0.05 * grad.sign(), -0.3, 0.3)
      inputs = torch.cat([x, torch.clamp(x + delta, 0, 1)])
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
      out = model(inputs)
      loss = loss_fn(out.float(), torch.cat([y, y]) if pgd_steps else y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

  for _ in range(5):
    step()
  torch.cuda.synchronize()
  start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
  start.record()
  for _ in range(steps):
    step()
  end.record()
  torch.cuda.synchronize()
  return start.elapsed_time(end) / steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  torch.backends.cudnn.benchmark = True
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
  began = time.time()
  for name, builder, shape, batch, pgd in PROTOCOLS:
    fp32 = time_steps(builder, shape, batch, pgd, args.steps, amp=False)
    bf16 = time_steps(builder, shape, batch, pgd, args.steps, amp=True)
    results[name] = {"batch": batch, "ms_fp32": round(fp32, 3), "ms_bf16": round(bf16, 3)}
    print(f"{name}: batch {batch}: {fp32:.2f} ms/step fp32(tf32), {bf16:.2f} ms/step bf16",
          flush=True)
  results["seconds"] = round(time.time() - began, 1)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
