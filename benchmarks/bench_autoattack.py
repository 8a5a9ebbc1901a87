"""AutoAttack in TensorFlow against torchattacks' and ART's, on the same weights and images.

Trains (or loads from --cache_dir) two small PGD-trained conv nets, MNIST
(eps 0.3) and CIFAR-10 (eps 8/255), exports their weights to PyTorch
(`benchmarks/peers/autoattack_peers.py`, run in the peers' own process) and
measures, on the first --examples test images with the true labels:

- each standard component alone (APGD-CE, APGD-T, FAB-T, Square), ours and
  torchattacks' (the issue's goal: within 1 point each);
- the whole standard AutoAttack, ours (`attacks.autoattack`), torchattacks'
  `AutoAttack(version="standard")` and ART's `AutoAttack` (APGD-CE, APGD-DLR,
  Square: the standard components ART has), each timed as one run, one after
  the other on the same CPU.

torchattacks' standard AutoAttack leaves its components' class default of 10
`steps` (the paper's standard is 100): the benchmark sets every side to the
same --steps (APGD-CE, APGD-T per target, FAB-T per target), --n_target_classes
and --n_queries (Square), one restart each, and says so in its output. Ours
runs APGD's first window as fra31's and torchattacks' code does
(`first_window=fra31`, `attacks/apgd.py`) unless --first_window=paper. Each
side draws its own random numbers, so the accuracies agree statistically.
Our time includes tracing and compiling (a fresh process's one evaluation).

  python -m benchmarks.bench_autoattack --data_dir=../shared/data [--examples=1000] \\
      [--datasets=cifar10,mnist] [--steps=100] [--n_queries=5000] [--peers=torchattacks,art]

Prints a table per data set and last (MNIST, the issue's primary case; the
CIFAR-10 line before it)
`autoattack robust accuracy ours vs torchattacks vs art: A vs B vs C; time ours/torchattacks X.XX, ours/art Y.YY`.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from robust_sparse.core import startup

startup.import_tensorflow()  # Quietly: robust_sparse/core/startup.py.

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.peers import install  # noqa: E402
from robust_sparse.attacks.apgd import FIRST_WINDOWS  # noqa: E402
from robust_sparse.attacks.autoattack import autoattack_report, check_components  # noqa: E402
from robust_sparse.attacks.pgd import pgd  # noqa: E402
from robust_sparse.attacks.registry import AttackConfig, make_attack  # noqa: E402
from robust_sparse.data import load_dataset  # noqa: E402

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# data set -> (toolkit name, L-inf eps, training epochs)
SETTINGS = {"mnist": ("digits", 0.3, 5), "cifar10": ("cifar10", 8 / 255, 4)}
PEERS = ("torchattacks", "art")
COMPONENT_TARGET, OVERALL_TARGET, SPEED_TARGET = 1.0, 0.5, 0.5


def define_flags():
  flags.DEFINE_string("data_dir", None, "folder with mnist/ and cifar-10/")
  flags.DEFINE_integer("examples", 1000, "test images attacked (the first ones)", lower_bound=1)
  flags.DEFINE_list("datasets", ["cifar10", "mnist"], "cifar10 and/or mnist (the last one's "
                    "line is printed last)")
  flags.DEFINE_integer("steps", 100, "APGD-CE's, and per target APGD-T's and FAB-T's, "
                       "iterations on every side (standard 100)", lower_bound=1)
  flags.DEFINE_integer("n_target_classes", 9, "APGD-T's and FAB-T's targets (standard 9)",
                       lower_bound=1)
  flags.DEFINE_integer("n_queries", 5000, "Square's queries on every side (standard 5000)",
                       lower_bound=1)
  flags.DEFINE_list("components", None, "components compared one by one (default: all four; "
                    "empty: none, only the whole AutoAttack)")
  flags.DEFINE_list("peers", list(PEERS), "torchattacks and/or art")
  flags.DEFINE_string("first_window", "fra31", "our APGD's first window: "
                      + " or ".join(FIRST_WINDOWS) + " (torchattacks runs fra31's)")
  flags.DEFINE_integer("seed", 0, "seed of training and of the attacks")
  flags.DEFINE_string("cache_dir", os.path.join(os.path.expanduser("~"), ".cache",
                                                "robust_sparse", "bench_autoattack"),
                      "trained weights are kept here and reused")
  flags.DEFINE_string("peers_dir", install.DEFAULT_FOLDER, "the peers' package folder")


def build(dataset, input_shape):
  """Two strided 'valid' convolutions (16 and 32 channels), dense 100, dense 10; ReLU."""
  first = 5 if dataset == "mnist" else 4
  return keras.Sequential([
      keras.Input(input_shape),
      keras.layers.Conv2D(16, first, strides=2, activation="relu"),
      keras.layers.Conv2D(32, 4, strides=2, activation="relu"),
      keras.layers.Flatten(), keras.layers.Dense(100, activation="relu"),
      keras.layers.Dense(10)])


def weights(model):
  """kernel_i, bias_i (and stride_i of a convolution) of each layer with weights, in order."""
  arrays, index = {}, 0
  for layer in model.layers:
    if hasattr(layer, "kernel"):
      arrays[f"kernel_{index}"] = np.asarray(layer.kernel)
      arrays[f"bias_{index}"] = np.asarray(layer.bias)
      if isinstance(layer, keras.layers.Conv2D):
        arrays[f"stride_{index}"] = np.asarray(layer.strides[0])
      index += 1
  return arrays


def trained(dataset, data, eps, epochs, seed, cache_dir, log):
  """PGD-trained network (L-inf, 7 steps of eps / 3), from the cache when there."""
  keras.utils.set_random_seed(seed)
  model = build(dataset, data.input_shape)
  path = os.path.join(cache_dir, f"{dataset}_conv_seed{seed}_epochs{epochs}.weights.h5")
  if os.path.exists(path):
    model.load_weights(path)
    log(f"{dataset}: weights from {path}")
    return model
  batch = 128
  per_epoch = len(data.x_train) // batch
  total = epochs * per_epoch
  schedule = keras.optimizers.schedules.CosineDecay(1e-3, total, alpha=0.1)
  optimizer = keras.optimizers.Adam(schedule)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  steps = {}

  def step_at(budget):
    """A compiled PGD-training step at this budget (the attack's budget is static)."""
    if budget not in steps:
      @tf.function(jit_compile=True)
      def step(x, y, seed):
        x_adv = pgd(model, x, y, eps=budget, step_size=budget / 3, steps=7, seed=seed)
        with tf.GradientTape() as tape:
          loss = loss_fn(y, model(x_adv, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
        return loss
      steps[budget] = step
    return steps[budget]

  start = time.perf_counter()
  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(data.x_train))
    for i in range(per_epoch):
      # The budget ramps up over the first third of training in 8 stages (eps / 8, 2 eps / 8,
      # ...): PGD training at MNIST's eps 0.3 from the first step leaves a network at chance.
      done = epoch * per_epoch + i
      budget = eps * min(8, 1 + (24 * done) // total) / 8
      index = order[i * batch:(i + 1) * batch]
      loss = step_at(budget)(tf.constant(data.x_train[index]), tf.constant(data.y_train[index]),
                             tf.constant([seed, done], tf.int32))
    log(f"{dataset}: epoch {epoch + 1}/{epochs} of PGD training, loss {float(loss):.3f} "
        f"({time.perf_counter() - start:.0f} s)")
  os.makedirs(cache_dir, exist_ok=True)
  model.save_weights(path)
  return model


def accuracy(model, x, y):
  return np.argmax(model.predict(x, batch_size=1000, verbose=0), -1) == y


def ours(model, x, y, eps, components, log):
  """{clean, each component alone, autoattack, *_seconds}: robust accuracies, ours."""
  clean = accuracy(model, x, y)
  out = {"clean": float(clean.mean())}
  seed = tf.constant([FLAGS.seed, 7], tf.int32)
  budget = dict(eps=eps, norm=np.inf, steps=FLAGS.steps, n_target_classes=FLAGS.n_target_classes,
                n_queries=FLAGS.n_queries, first_window=FLAGS.first_window)
  for name in components:
    attack = make_attack(AttackConfig(name, labels="true", **budget))
    start = time.perf_counter()
    adv = attack(model, x, y, seed).numpy()
    out[f"{name}_seconds"] = time.perf_counter() - start
    out[name] = float((accuracy(model, adv, y) & clean).mean())
    log(f"  ours {name}: {100 * out[name]:.1f} % ({out[f'{name}_seconds']:.0f} s)")
  start = time.perf_counter()
  adv, broken = autoattack_report(model, x, y, seed=seed, **budget)
  adv, broken = adv.numpy(), broken.numpy()
  out["autoattack_seconds"] = time.perf_counter() - start
  robust = accuracy(model, adv, y) & clean
  out["autoattack"] = float(robust.mean())
  # The worst case per example: robust iff clean-correct and no component broke it.
  assert np.array_equal(clean & ~broken.any(0), robust)
  log(f"  ours autoattack: {100 * out['autoattack']:.1f} % ({out['autoattack_seconds']:.0f} s, "
      f"compiling included)")
  return out


def theirs(model, x, y, eps, components, env, log):
  folder = tempfile.mkdtemp(prefix="bench_autoattack_")
  exchange, result = os.path.join(folder, "in.npz"), os.path.join(folder, "out.json")
  np.savez(exchange, **weights(model), x=x, y=y, logits=model.predict(x, verbose=0),
           eps=eps, norm=np.inf, steps=FLAGS.steps, n_target_classes=FLAGS.n_target_classes,
           n_queries=FLAGS.n_queries, seed=FLAGS.seed, classes=10,
           components=np.asarray(list(components), dtype=str),
           peers=np.asarray(FLAGS.peers, dtype=str))
  subprocess.run([sys.executable, "-m", "benchmarks.peers.autoattack_peers", exchange, result],
                 cwd=REPO, env=env, check=True)
  with open(result) as f:
    out = json.load(f)
  log(f"  PyTorch port's logits within {out['logits_max_difference']:.1e} of ours")
  return out


def load():
  """The system's 1-minute load average (other sessions share the CPU)."""
  return os.getloadavg()[0]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.data_dir is None or not os.path.isdir(FLAGS.data_dir):
    sys.exit(f"--data_dir={FLAGS.data_dir}: not a folder")
  unknown = sorted(set(FLAGS.datasets) - set(SETTINGS))
  if unknown or not FLAGS.datasets:
    sys.exit(f"--datasets: unknown or none {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
  unknown = sorted(set(FLAGS.peers) - set(PEERS))
  if unknown or not FLAGS.peers:
    sys.exit(f"--peers: unknown or none {', '.join(unknown)}; known: {', '.join(PEERS)}")
  if FLAGS.first_window not in FIRST_WINDOWS:
    sys.exit(f"--first_window={FLAGS.first_window}: one of {', '.join(FIRST_WINDOWS)}")
  try:
    components = (check_components(None) if FLAGS.components is None
                  else check_components(FLAGS.components) if FLAGS.components else ())
  except ValueError as error:
    sys.exit(f"--components: {error}")
  modules = ["torch"] + (["torchattacks"] if "torchattacks" in FLAGS.peers else []) + (
      ["art", "multiprocess"] if "art" in FLAGS.peers else [])
  env = install.ensure(modules, os.path.expanduser(FLAGS.peers_dir))
  if env is None:
    sys.exit(f"bench_autoattack: the peers' {', '.join(modules)} are missing (see above)")
  # Each component and configuration is its own trace; TensorFlow's retracing notes are noise here.
  tf.get_logger().setLevel("ERROR")
  log = lambda text: print(text, flush=True)  # noqa: E731
  log(f"budget on every side: L-inf, {FLAGS.steps} steps (APGD-CE; APGD-T and FAB-T per "
      f"target), {FLAGS.n_target_classes} targets, Square {FLAGS.n_queries} queries, 1 restart "
      f"each; ours with first_window={FLAGS.first_window}; torchattacks AutoAttack("
      f"version='standard') with its components' steps set to {FLAGS.steps} (its default 10); "
      f"ART AutoAttack of APGD-CE, APGD-DLR (untargeted), Square (ART has no FAB, and its "
      f"targeted mode reruns every component against every class)")
  summaries = []
  for dataset in FLAGS.datasets:
    name, eps, epochs = SETTINGS[dataset]
    data = load_dataset(name, FLAGS.data_dir, valid_size=0)  # All training images.
    model = trained(dataset, data, eps, epochs, FLAGS.seed, FLAGS.cache_dir, log)
    x = np.ascontiguousarray(data.x_test[:FLAGS.examples], np.float32)
    y = data.y_test[:FLAGS.examples].astype(np.int64)
    log(f"{dataset}: eps {eps:.4g}, {len(x)} test images, load {load():.2f} before ours")
    a = ours(model, x, y, eps, components, log)
    log(f"{dataset}: load {load():.2f} before the peers")
    b = theirs(model, x, y, eps, components, env, log)
    log(f"{dataset}: load {load():.2f} after the peers (torch threads {b['torch_threads']}, "
        f"TensorFlow's: the default)")
    rows = []
    for attack in ("clean",) + tuple(components) + ("autoattack",):
      theirs_value = b.get(attack)
      rows.append((attack, f"{100 * a[attack]:.1f}",
                   "-" if theirs_value is None else f"{100 * theirs_value:.1f}",
                   "-" if theirs_value is None else f"{100 * abs(a[attack] - theirs_value):.1f}",
                   f"{a.get(attack + '_seconds', 0):.1f}",
                   f"{b.get(attack + '_seconds', 0):.1f}"))
    if "art_autoattack" in b:
      rows.append(("art autoattack", "", f"{100 * b['art_autoattack']:.1f}", "",
                   "", f"{b['art_autoattack_seconds']:.1f}"))
    header = ("attack", "ours %", "peer %", "|diff| pts", "ours s", "peer s")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"{dataset} (eps {eps:.4g}, clean {100 * a['clean']:.1f} %):")
    for row in [header] + rows:
      print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    worst = max([100 * abs(a[c] - b[c]) for c in components if c in b] or [float("nan")])
    print(f"{dataset}: worst component |ours - torchattacks| {worst:.1f} points "
          f"(target {COMPONENT_TARGET:g})")
    summaries.append(_summary(a, b))
  for line in summaries:
    print(line)


def _summary(a, b):
  def percent(key):
    return f"{100 * b[key]:.1f}" if key in b else "n/a"

  def ratio(key):
    return f"{a['autoattack_seconds'] / b[key]:.2f}" if key in b else "n/a"

  return (f"autoattack robust accuracy ours vs torchattacks vs art: {100 * a['autoattack']:.1f} "
          f"vs {percent('autoattack')} vs {percent('art_autoattack')}; time ours/torchattacks "
          f"{ratio('autoattack_seconds')}, ours/art {ratio('art_autoattack_seconds')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
