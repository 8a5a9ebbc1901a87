"""Benchmark: training steps/s of the seeds' models: the engine, Keras `fit`, eager PyTorch.

For each model (default: conv-bn, resnet18, resnet18_maxpool, vgg16_bn,
wideresnet16x4 and vit_tiny on CIFAR-10 at batch 128, and dense-300-100 on
MNIST at batch 60), on real training batches:

- engine: `robust_sparse.training.engine.Engine` with its default `compile="auto"`
  (the row prints `engine.compile_mode`), for each of `--kinds`: natural
  training; PGD-10 adversarial training (`pgd10`: the toolkit's default
  mix 0.5 of the clean and adversarial losses in one pass over both, the
  model's own predictions as the attack's labels; eps 8/255, step 2/255 on
  CIFAR-10, the lottery seed's eps 0.3, step 0.05 on MNIST); SAM (`sam`:
  `robust_sparse.training.sharpness.sam.sharpness_aware`, rho 0.05);
- fit: Keras' `model.fit` of the same model, optimizer and batches, with
  `jit_compile=True` ("jit") and False ("no jit"); the better of the two is
  marked `*`;
- pytorch: the model's PyTorch counterpart (`benchmarks/peers/torch_models.py`,
  the same layers and trainable parameter count, asserted here) with the same
  optimizer and batch size, in eager PyTorch (`benchmarks/peers/
  torch_step_rate.py`, in its own process with torch from the peers' folder,
  `benchmarks/peers/install.py`), natural training, and PGD-10 and SAM with
  `--torch_kinds`; torch's default threads (one per core). Twice by default:
  with torch's own OpenMP settings, and with OMP_WAIT_POLICY=PASSIVE. Idle,
  the two run alike; when other processes hold the cores, threads that spin
  while they wait for each other slow PyTorch many times over (dense-300-100
  at load 5 on 2 cores: 12-60 steps/s spinning, 170-280 passive), which would
  flatter the engine. The faster is marked `*` and is the ratio's reference.

Optimizers: SGD (momentum 0.9, lr 0.01, weight decay 5e-4, `torch.optim.SGD`'s
meaning) for the CIFAR-10 nets, Adam (lr 0.0012) for dense-300-100 (the
lottery seed's). Every row of a model trains its own copy of the same initial
weights.

Timing: each row first runs `--warmup` chunks (its first call, compilation
included, is reported as `first s`; `compile s` is that minus the time of a
chunk at the measured rate), then timed chunks of `--steps` steps
(`--dense_steps` for dense-300-100), every row of a model in turn, in reverse
order every other round, so a busy machine slows all alike: `--repeats`
chunks for the rows of the last line's ratio (the engine's and PyTorch's
natural training), `--other_repeats` for the others (fit, and PGD-10 and SAM,
about 9 and 2 natural steps of work each). steps/s is steps over the median
chunk time. The PyTorch processes stay up for the whole model and run their
chunks when asked, in the same rounds.

GFLOP/s is the row's steps/s times the FLOPs of one step of its kind, as
`torch.utils.flop_counter.FlopCounterMode` counts them in the PyTorch
counterpart (matrix products, convolutions and attention, forward and
backward; the same algorithm in both frameworks): a natural step is one
forward and one backward pass; a PGD-10 step is a prediction, 10
forward-backward passes to the input and one training pass over the doubled
batch (about 9 natural steps of FLOPs on these models, roughly 11 passes);
a SAM step two forward-backward passes (2 natural steps).

  python -m benchmarks.bench_models --data_dir=DIR [--models=resnet18,vit_tiny]
      [--kinds=natural,pgd10,sam] [--torch_kinds=natural] [--fit=jit,nojit]
      [--torch_wait_policies=default,passive] [--quick]

The whole default run took 18 and 24 minutes on a 2-core CPU that other jobs
shared (load 3 to 8); `--quick` (natural rows only, no jit `fit`, one timed
chunk each) takes a few. Under such load one chunk can run 2-4x slower than
the next: compare rows of one run, and rerun a model with more `--repeats`
and `--other_repeats` before trusting a single ratio. The last line:
`models engine/pytorch steps/s: min X.XX (model), median Y.YY`, over the
models, of the engine's natural steps/s over PyTorch's (the faster PyTorch
setting). Each model's lines end with the machine's load; above the number
of cores the timings are noisy. Not a test: timings
depend on the machine; only the ratios are meaningful. Without torch (not
installed and not installable) it says so and exits 0.
"""

from robust_sparse.core import startup

startup.import_tensorflow()  # Quietly: robust_sparse/core/startup.py.

import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable, List  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from robust_sparse.attacks import AttackConfig, make_attack  # noqa: E402
from benchmarks.peers import install  # noqa: E402
from robust_sparse.data import DataError, load_dataset  # noqa: E402
from robust_sparse.models import build_model  # noqa: E402
from robust_sparse.models.check_zoo import trainable_count  # noqa: E402
from robust_sparse.training import arrays  # noqa: E402
from robust_sparse.training.engine import Engine, index_stream  # noqa: E402
from robust_sparse.training.optimizers import make_optimizer  # noqa: E402
from robust_sparse.training.sharpness.sam import sharpness_aware  # noqa: E402
from robust_sparse.training.steps import OptimizerGroup, standard_loss_grad_fn  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("natural", "pgd10", "sam")
FIT_MODES = {"jit": True, "nojit": False}
WAIT_POLICIES = ("default", "passive")


@dataclasses.dataclass(frozen=True)
class Setting:
  """A model's data, batch, optimizer and PGD budget (the same on every front-end)."""
  dataset: str  # The toolkit's data set name.
  peer_dataset: str  # torch_step_rate's --dataset.
  batch_size: int
  optimizer: str
  learning_rate: float
  momentum: float
  weight_decay: float
  eps: float
  pgd_step_size: float


MNIST = Setting("digits", "mnist", 60, "adam", 0.0012, 0.0, 0.0, 0.3, 0.05)
CIFAR = Setting("cifar10", "cifar10", 128, "sgd", 0.01, 0.9, 5e-4, 8 / 255, 2 / 255)
SETTINGS = {
    "conv-bn": CIFAR, "resnet18": CIFAR, "resnet18_maxpool": CIFAR, "vgg16_bn": CIFAR,
    "wideresnet16x4": CIFAR, "vit_tiny": CIFAR, "dense-300-100": MNIST,
}


def define_flags():
  """The flags, defined when run as a program (tests import SETTINGS without them)."""
  flags.DEFINE_string("data_dir", None, "folder with mnist/ and cifar-10/ (the official files)")
  flags.DEFINE_list("models", list(SETTINGS), f"models to time: {', '.join(SETTINGS)}")
  flags.DEFINE_list("kinds", list(KINDS), f"the engine's step kinds: {', '.join(KINDS)}")
  flags.DEFINE_list("torch_kinds", ["natural"], f"PyTorch's step kinds: {', '.join(KINDS)}")
  flags.DEFINE_list("fit", list(FIT_MODES), "Keras fit rows: jit, nojit (empty: none)")
  flags.DEFINE_list("torch_wait_policies", list(WAIT_POLICIES),
                    "PyTorch rows per OpenMP wait policy: default (torch's own), passive "
                    "(OMP_WAIT_POLICY=PASSIVE: threads sleep, not spin, while they wait)")
  flags.DEFINE_integer("steps", 1, "steps per timed chunk (CIFAR-10 nets)", lower_bound=1)
  flags.DEFINE_integer("dense_steps", 300, "steps per timed chunk (dense-300-100)",
                       lower_bound=1)
  flags.DEFINE_integer("repeats", 3, "timed chunks of the engine's and PyTorch's natural rows",
                       lower_bound=1)
  flags.DEFINE_integer("other_repeats", 1, "timed chunks of each other row (fit, PGD-10, SAM)",
                       lower_bound=1)
  flags.DEFINE_integer("warmup", 1, "untimed chunks of each row first (the first call: "
                       "compilation)", lower_bound=1)
  flags.DEFINE_integer("examples", 4096, "CIFAR-10 training images used (the first ones)",
                       lower_bound=128)
  flags.DEFINE_bool("quick", False, "a quicker run: --kinds=natural --torch_kinds=natural "
                    "--fit=nojit --repeats=1")
  flags.DEFINE_string("peers_dir", install.DEFAULT_FOLDER, "folder the peers' torch is "
                      "installed into (never this environment)")
  flags.DEFINE_bool("install_peers", True, "install torch into --peers_dir if missing")
  flags.mark_flag_as_required("data_dir")


FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------
# Rows: one front-end and step kind of one model.


@dataclasses.dataclass
class Row:
  """One timed thing: `run(steps)` trains `steps` steps."""
  front_end: str  # engine / fit / pytorch
  kind: str
  run: Callable[[int], object]
  chunk: int  # steps per chunk
  repeats: int
  mode: str = ""  # the engine's compile mode, fit's jit
  first: float = 0.0
  times: List[float] = dataclasses.field(default_factory=list)
  best: bool = False

  @property
  def steps_per_second(self):
    return self.chunk / statistics.median(self.times)

  @property
  def compile_seconds(self):
    return max(0.0, self.first - self.chunk / self.steps_per_second)


def time_rows(rows, warmup, name):
  """Warm-up chunks of every row (the first timed: `first`), then interleaved rounds.

  Progress goes to stderr (a CIFAR-10 model takes minutes).
  """
  for row in rows:
    for index in range(warmup):
      start = time.perf_counter()
      row.run(row.chunk)
      if index == 0:
        row.first = time.perf_counter() - start
    print(f"{name} {row.front_end} {row.kind} ({row.mode}): first call {row.first:.1f} s",
          file=sys.stderr, flush=True)
  for round_index in range(max(row.repeats for row in rows)):
    for row in (rows if round_index % 2 == 0 else rows[::-1]):
      if len(row.times) < row.repeats:
        start = time.perf_counter()
        row.run(row.chunk)
        row.times.append(time.perf_counter() - start)
    print(f"{name}: round {round_index + 1} timed", file=sys.stderr, flush=True)


class TorchPeer:
  """`benchmarks/peers/torch_step_rate.py --serve` for one model: it counts the FLOPs
  of each kind, then trains the chunks asked for, while this process waits."""

  def __init__(self, model_name, setting, kinds, examples, env, wait_policy):
    self._log = tempfile.TemporaryFile("w+")
    self.wait_policy = wait_policy
    if wait_policy != "default":
      env = dict(env, OMP_WAIT_POLICY=wait_policy.upper())
    command = [sys.executable, "-m", "benchmarks.peers.torch_step_rate", "--serve",
               f"--data_dir={FLAGS.data_dir}", f"--model={model_name}",
               f"--dataset={setting.peer_dataset}", f"--batch_size={setting.batch_size}",
               f"--kinds={','.join(kinds)}", f"--optimizer={setting.optimizer}",
               f"--learning_rate={setting.learning_rate}", f"--momentum={setting.momentum}",
               f"--weight_decay={setting.weight_decay}", f"--eps={setting.eps}",
               f"--pgd_step_size={setting.pgd_step_size}"]
    if setting.peer_dataset == "cifar10":
      command.append(f"--examples={examples}")
    self._process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)
    self.info = None

  def _reply(self):
    line = self._process.stdout.readline()
    if not line:
      self._log.seek(0)
      sys.exit(f"error: the PyTorch peer failed:\n{self._log.read()[-3000:]}")
    return json.loads(line)

  def ready(self):
    """The peer's start-up answer: parameters, FLOPs per kind, threads."""
    if self.info is None:
      self.info = self._reply()
    return self.info

  def run(self, kind, steps):
    self._process.stdin.write(json.dumps({"kind": kind, "steps": steps}) + "\n")
    self._process.stdin.flush()
    return self._reply()["seconds"]

  def close(self):
    self._process.stdin.close()
    self._process.wait()
    self._log.close()


# ----------------------------------------------------------------------------
# The toolkit's front-ends.


def _optimizer(setting):
  return make_optimizer(setting.optimizer, setting.learning_rate, momentum=setting.momentum,
                        weight_decay=setting.weight_decay)


def _attack(setting):
  return make_attack(AttackConfig("pgd", eps=setting.eps, step_size=setting.pgd_step_size,
                                  steps=10))


def engine_row(kind, model, x, y, setting, num_classes, chunk, repeats):
  attack = _attack(setting) if kind == "pgd10" else None
  sharpness = ((lambda inner: sharpness_aware(inner, model, rho=0.05)) if kind == "sam"
               else None)
  loss_grad = standard_loss_grad_fn(model, num_classes=num_classes, attack=attack,
                                    adv_mix=0.5, sharpness=sharpness)
  engine = Engine(model, loss_grad, [OptimizerGroup("weights", _optimizer(setting))],
                  x_train=x, y_train=y, batch_size=setting.batch_size, attack=attack,
                  adv_train=kind == "pgd10", adv_mix=0.5)
  batches = engine.batches(seed=0)
  return Row("engine", kind, lambda steps: engine.train(batches, steps), chunk, repeats,
             mode=engine.compile_mode)


def fit_row(jit, model, x, y, setting, chunk, repeats):
  model.compile(optimizer=_optimizer(setting),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=FIT_MODES[jit], steps_per_execution=min(chunk, 50))
  images, labels = arrays.as_tensor(x), tf.constant(y, tf.int32)
  batches = index_stream(len(x), setting.batch_size, seed=0).map(
      lambda i: (tf.gather(images, i), tf.gather(labels, i)),
      num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

  def run(steps):
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)

  return Row("fit", "natural", run, chunk, repeats, mode="jit" if FIT_MODES[jit] else "no jit")


# ----------------------------------------------------------------------------


def time_model(model_name, dataset, env, kinds, torch_kinds, fit_modes):
  """Every row of one model, timed; returns them and the peer's FLOPs per kind."""
  setting = SETTINGS[model_name]
  x, y = dataset.x_train, dataset.y_train
  if setting is CIFAR:
    x, y = x[:FLAGS.examples], y[:FLAGS.examples]
  chunk = FLAGS.dense_steps if setting is MNIST else FLAGS.steps
  peers = [TorchPeer(model_name, setting, sorted(set(kinds) | set(torch_kinds)),
                     FLAGS.examples, env, policy) for policy in FLAGS.torch_wait_policies]
  try:
    keras.utils.set_random_seed(0)
    first = build_model(model_name, dataset.input_shape, dataset.num_classes)
    weights = first.get_weights()
    count = trainable_count(first)
    del first

    def copy():
      model = build_model(model_name, dataset.input_shape, dataset.num_classes)
      model.set_weights(weights)
      return model

    rows = []
    for kind in kinds:
      rows.append(engine_row(kind, copy(), x, y, setting, dataset.num_classes, chunk,
                             FLAGS.repeats if kind == "natural" else FLAGS.other_repeats))
    for jit in fit_modes:
      rows.append(fit_row(jit, copy(), x, y, setting, chunk, FLAGS.other_repeats))
    for peer in peers:
      info = peer.ready()
      if info["parameters"] != count:
        sys.exit(f"error: {model_name}: the PyTorch counterpart has {info['parameters']:,} "
                 f"trainable parameters, the Keras model {count:,}")
      policy = "" if peer.wait_policy == "default" else f", OMP {peer.wait_policy}"
      for kind in torch_kinds:
        rows.append(Row("pytorch", kind, lambda steps, k=kind, p=peer: p.run(k, steps), chunk,
                        FLAGS.repeats if kind == "natural" else FLAGS.other_repeats,
                        mode=f"eager, {info['threads']} threads{policy}"))
    time_rows(rows, FLAGS.warmup, model_name)
  finally:
    for peer in peers:
      peer.close()
  for front_end in ("fit", "pytorch"):
    candidates = [row for row in rows if row.front_end == front_end and row.kind == "natural"]
    if len(candidates) > 1:
      max(candidates, key=lambda row: row.steps_per_second).best = True
  return rows, info["flops"], count


HEADER = (f"{'model':<17} {'front-end':<8} {'kind':<8} {'steps/s':>9} {'GFLOP/s':>8} "
          f"{'first s':>8} {'compile s':>9}  mode")


def print_rows(model_name, rows, flops):
  for row in rows:
    rate = row.steps_per_second
    gflops = rate * flops[row.kind] / 1e9
    first = f"{row.first:8.2f} {row.compile_seconds:9.2f}"
    mode = row.mode + (" *" if row.best else "")
    print(f"{model_name:<17} {row.front_end:<8} {row.kind:<8} {rate:9.3f} {gflops:8.1f} "
          f"{first}  {mode}", flush=True)


def check_flags():
  """The flags' names, or a one-line error (returned as a string)."""
  for flag, known in (("models", SETTINGS), ("kinds", KINDS), ("torch_kinds", KINDS),
                      ("fit", FIT_MODES), ("torch_wait_policies", WAIT_POLICIES)):
    unknown = [name for name in getattr(FLAGS, flag) if name not in known]
    if unknown:
      return f"unknown --{flag} {', '.join(unknown)}; known: {', '.join(known)}"
  if "natural" not in FLAGS.kinds or "natural" not in FLAGS.torch_kinds:
    return "--kinds and --torch_kinds must include natural (the last line's ratio)"
  if not FLAGS.torch_wait_policies:
    return "--torch_wait_policies needs at least one of default, passive"
  return None


def main(argv):
  del argv
  began = time.perf_counter()
  if FLAGS.quick:
    FLAGS.kinds, FLAGS.torch_kinds, FLAGS.fit, FLAGS.repeats = (
        ["natural"], ["natural"], ["nojit"], 1)
  # Every row builds an engine whose functions TensorFlow traces afresh, which its
  # retracing warning takes for a loop that retraces.
  tf.get_logger().setLevel(logging.ERROR)
  error = check_flags()
  if error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  env = install.ensure(["torch"], FLAGS.peers_dir, FLAGS.install_peers)
  if env is None:
    return 0
  datasets = {}
  try:
    for name in FLAGS.models:
      setting = SETTINGS[name]
      if setting.dataset not in datasets:
        datasets[setting.dataset] = load_dataset(setting.dataset, FLAGS.data_dir,
                                                 valid_size=0)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; batch 128 on CIFAR-10 "
        f"(first {FLAGS.examples} training images), 60 on MNIST; chunks of {FLAGS.steps} "
        f"steps ({FLAGS.dense_steps} for dense-300-100); `*`: the faster fit and PyTorch",
        flush=True)
  print(HEADER, flush=True)
  ratios = {}
  for name in FLAGS.models:
    rows, flops, count = time_model(name, datasets[SETTINGS[name].dataset], env,
                                    FLAGS.kinds, FLAGS.torch_kinds, FLAGS.fit)
    print_rows(name, rows, flops)
    rate = {}
    for row in rows:  # The faster PyTorch setting where there are two.
      key = row.front_end, row.kind
      rate[key] = max(rate.get(key, 0.0), row.steps_per_second)
    ratios[name] = rate["engine", "natural"] / rate["pytorch", "natural"]
    print(f"{name:<17} {count:,} trainable parameters (both); "
          f"{flops['natural'] / 1e9:.2f} GFLOP per natural step; "
          f"engine/pytorch natural {ratios[name]:.2f}; load {os.getloadavg()[0]:.1f}",
          flush=True)
    del rows
    gc.collect()
  worst = min(ratios, key=ratios.get)
  print(f"total {time.perf_counter() - began:.0f} s, load {os.getloadavg()[0]:.1f}")
  print(f"models engine/pytorch steps/s: min {ratios[worst]:.2f} ({worst}), median "
        f"{statistics.median(ratios.values()):.2f}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
