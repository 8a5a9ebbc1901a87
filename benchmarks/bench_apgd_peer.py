"""Check: our `apgd_ce` against torchattacks' `APGD(loss="ce")` on the same weights.

A dense-300-100 is trained briefly on MNIST (Keras `fit`), its weights are
copied into an equivalent PyTorch `nn.Sequential`, and both APGD-CE
implementations (100 iterations, one random start, true labels) attack the same
test images at each eps. Robust accuracies should agree within 1 point (the
random starts differ, so a few examples may fall either way). Also prints the
wall time of both (ours called eagerly, as a notebook calls it: the first call
compiles, so the time is given with and without it).

torch and torchattacks are needed only here, not by the toolkit: what is
missing is installed into a folder of their own (`--peers_dir`,
`benchmarks/peers/install.py`), appended to this process's path only.

  python -m benchmarks.bench_apgd_peer --data_dir=DIR [--examples=1000]

The last line: `apgd_ce robust accuracy ours vs torchattacks: A vs B (diff D points)`
at the budget where the two differ most.
"""

from robust_sparse.core import startup

startup.import_tensorflow()  # Quietly: robust_sparse/core/startup.py.

import sys  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from robust_sparse.attacks import apgd_ce  # noqa: E402
from benchmarks.peers import install  # noqa: E402
from robust_sparse.data import load_dataset  # noqa: E402
from robust_sparse.models import build_model  # noqa: E402

flags.DEFINE_string("data_dir", None, "folder with mnist/ (else tensorflow-datasets)")
flags.DEFINE_integer("examples", 1000, "test images attacked")
flags.DEFINE_integer("steps", 100, "APGD iterations")
flags.DEFINE_list("linf_eps", ["0.05", "0.1", "0.3"], "L-infinity budgets")
flags.DEFINE_list("l2_eps", ["1.5"], "L2 budgets (empty: none)")
flags.DEFINE_integer("train_epochs", 1, "epochs of Keras training before the attacks")
flags.DEFINE_integer("batch_size", 500, "examples per attack call (both implementations)")
flags.DEFINE_integer("seed", 0, "training and attack seed")
flags.DEFINE_string("peers_dir", install.DEFAULT_FOLDER, "folder for the peer's torch and "
                    "torchattacks (never this environment)")
FLAGS = flags.FLAGS


def _import_peer():
  if install.ensure(["torch", "torchattacks"], FLAGS.peers_dir) is None:
    raise SystemExit(1)
  sys.path.append(FLAGS.peers_dir)  # After site-packages: this process's numpy stays.
  import torch  # pylint: disable=import-outside-toplevel
  import torchattacks  # pylint: disable=import-outside-toplevel
  return torch, torchattacks


def _train(data):
  keras.utils.set_random_seed(FLAGS.seed)
  model = build_model("dense-300-100", data.input_shape, data.num_classes)
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(data.x_train, data.y_train, epochs=FLAGS.train_epochs, batch_size=128, verbose=0)
  return model


def _torch_copy(torch, model):
  """The same network in PyTorch: Flatten, then bias-free Linear layers with ReLUs."""
  kernels = [np.asarray(layer.masked_kernel) for layer in model.layers
             if hasattr(layer, "masked_kernel")]
  modules = [torch.nn.Flatten()]
  for i, kernel in enumerate(kernels):
    linear = torch.nn.Linear(*kernel.shape, bias=False)
    with torch.no_grad():
      linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
    modules.append(linear)
    if i < len(kernels) - 1:
      modules.append(torch.nn.ReLU())
  return torch.nn.Sequential(*modules).eval()


def _batches(n):
  return [slice(i, min(i + FLAGS.batch_size, n)) for i in range(0, n, FLAGS.batch_size)]


def _ours(model, x, y, eps, norm):
  adversarial = [apgd_ce(model, x[b], y[b], eps=eps, steps=FLAGS.steps, norm=norm,
                         seed=tf.constant([FLAGS.seed, i])).numpy()
                 for i, b in enumerate(_batches(len(x)))]
  return np.concatenate(adversarial)


def _theirs(torch, torchattacks, net, x, y, eps, norm):
  attack = torchattacks.APGD(net, norm="Linf" if norm == np.inf else "L2", eps=eps,
                             steps=FLAGS.steps, n_restarts=1, seed=FLAGS.seed, loss="ce")
  adversarial = [attack(torch.from_numpy(x[b]), torch.from_numpy(y[b])).detach().numpy()
                 for b in _batches(len(x))]
  return np.concatenate(adversarial)


def main(_):
  torch, torchattacks = _import_peer()
  data = load_dataset("digits", FLAGS.data_dir)
  start = time.perf_counter()
  model = _train(data)
  print(f"trained dense-300-100 for {FLAGS.train_epochs} epoch(s) in "
        f"{time.perf_counter() - start:.1f} s")
  net = _torch_copy(torch, model)
  x = np.ascontiguousarray(data.x_test[:FLAGS.examples], np.float32)
  y = data.y_test[:FLAGS.examples].astype(np.int64)
  ours_logits = model(x).numpy()
  with torch.no_grad():
    theirs_logits = net(torch.from_numpy(x)).numpy()
  print(f"same network: max |logit difference| {np.abs(ours_logits - theirs_logits).max():.2e}")
  clean = np.mean(ours_logits.argmax(-1) == y)
  print(f"clean accuracy on {len(x)} test images: {100 * clean:.1f} %")

  def ours_accuracy(x_adv):
    return 100 * np.mean(model(x_adv).numpy().argmax(-1) == y)

  def theirs_accuracy(x_adv):
    with torch.no_grad():
      return 100 * np.mean(net(torch.from_numpy(x_adv)).numpy().argmax(-1) == y)

  budgets = ([(np.inf, float(e)) for e in FLAGS.linf_eps]
             + [(2, float(e)) for e in FLAGS.l2_eps])
  results = []
  for norm, eps in budgets:
    name = f"{'Linf' if norm == np.inf else 'L2'} eps {eps:g}"
    start = time.perf_counter()
    ours_adv = _ours(model, x, y, eps, norm)
    ours_first = time.perf_counter() - start
    start = time.perf_counter()
    ours_adv = _ours(model, x, y, eps, norm)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs_adv = _theirs(torch, torchattacks, net, x, y, eps, norm)
    theirs_seconds = time.perf_counter() - start
    size = (np.abs if norm == np.inf else np.square)(ours_adv - x).reshape(len(x), -1)
    size = size.max(axis=1) if norm == np.inf else np.sqrt(size.sum(axis=1))
    assert np.all(size <= eps * (1 + 1e-5)), f"{name}: ours left the ball ({size.max()})"
    ours, theirs = ours_accuracy(ours_adv), theirs_accuracy(theirs_adv)
    # Each attack's examples on the other implementation's network: the networks agree.
    cross = theirs_accuracy(ours_adv)
    results.append((name, ours, theirs))
    print(f"{name}: robust accuracy ours {ours:.1f} % (on the torch network {cross:.1f} %), "
          f"torchattacks {theirs:.1f} %; time ours {ours_seconds:.2f} s "
          f"({ours_first:.2f} s with compilation), torchattacks {theirs_seconds:.2f} s "
          f"(ours/theirs {ours_seconds / theirs_seconds:.2f})")
  name, ours, theirs = max(results, key=lambda r: abs(r[1] - r[2]))
  print(f"apgd_ce robust accuracy ours vs torchattacks: {ours:.1f} vs {theirs:.1f} "
        f"(diff {abs(ours - theirs):.1f} points) at {name}, the largest difference over "
        f"{', '.join(r[0] for r in results)} (target <= 1)")


if __name__ == "__main__":
  app.run(main)
