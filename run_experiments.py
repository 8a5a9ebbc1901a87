"""Runs lottery-ticket experiments with optional adversarial training.

  python -m run_experiments --dataset=sklearn_digits --train_iters=300 \
      --prune_iters=2 --eval_every=100 --trials=1 --attack=fgsm --adv_train

Flags keep the names and defaults of robust-sparse-networks. Results go to a
folder under --base_dir derived from the hyper-parameters; re-running the same
command resumes it, --force starts it over. Only this file reads FLAGS.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from attacks import ATTACKS  # noqa: E402
from attacks.registry import IMPLEMENTATIONS  # noqa: E402
from data import DATASETS, DataError, default_valid_size, load_dataset  # noqa: E402
from experiments import EXPERIMENTS, REWIND_TARGETS  # noqa: E402
from experiments.lottery import LotteryRunner  # noqa: E402
from models import MODELS  # noqa: E402
from robust_sparse import activations  # noqa: E402
from robust_sparse.hparams import Hparams  # noqa: E402
from robust_sparse.pruning import SCOPES  # noqa: E402

_D = Hparams()
FLAGS = flags.FLAGS

flags.DEFINE_integer("trials", _D.trials, "number of trials per experiment", lower_bound=1)
flags.DEFINE_integer("train_iters", _D.train_iters, "training iterations per prune iteration",
                     lower_bound=1)
flags.DEFINE_integer("prune_iters", _D.prune_iters, "number of pruning iterations",
                     lower_bound=0)
flags.DEFINE_integer("eval_every", _D.eval_every,
                     "evaluate on the full validation and test sets every this many "
                     "training iterations", lower_bound=1)
flags.DEFINE_integer("batch_size", _D.batch_size, "batch size", lower_bound=1)
flags.DEFINE_integer("valid_size", None,
                     "validation set size: the first training images (default 10000; "
                     f"{default_valid_size('sklearn_digits')} for sklearn_digits)",
                     lower_bound=1)
flags.DEFINE_enum("dataset", _D.dataset, DATASETS.names(), "source data set")
flags.DEFINE_string("data_dir", None,
                    "folder with the official raw files (mnist/, fashion-mnist/, "
                    "cifar-10/cifar-10-batches-bin/); unset: tensorflow-datasets")
flags.DEFINE_enum("model", _D.model, MODELS.names(), "model architecture")
flags.DEFINE_string("activation", _D.activation,
                    f"hidden activation spec; names: {', '.join(activations.names())}")
flags.DEFINE_enum("experiment", _D.experiment, EXPERIMENTS.names(), "the experiment to run")
flags.DEFINE_string("base_dir", "./output", "base output directory for results and checkpoints")
flags.DEFINE_enum("attack", _D.attack, ATTACKS.names(),
                  "adversarial attack used for training and evaluation")
flags.DEFINE_enum("attack_impl", _D.attack_impl, list(IMPLEMENTATIONS),
                  "native compiled attacks, or cleverhans' functions as the seed used")
flags.DEFINE_float("eps", _D.eps, "L-infinity attack budget", lower_bound=0.0)
flags.DEFINE_float("pgd_step_size", _D.pgd_step_size, "PGD step size", lower_bound=0.0)
flags.DEFINE_integer("pgd_steps", _D.pgd_steps, "PGD steps", lower_bound=0)
flags.DEFINE_bool("adv_train", _D.adv_train, "use adversarial training for the given attack")
flags.DEFINE_float("adv_mix", _D.adv_mix,
                   "weight of the adversarial loss in adversarial training",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate", lower_bound=0.0,
                   short_name="lr")
flags.DEFINE_float("l1_reg", _D.l1_reg, "L1 kernel penalty", lower_bound=0.0, short_name="l1")
flags.DEFINE_float("label_smoothing", _D.label_smoothing,
                   "label smoothing of the training loss (the seed uses 0.1)",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("prune_rate", _D.prune_rate,
                   "fraction of the active weights pruned per iteration (hidden layers; "
                   "all layers with --prune_scope=global)", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("prune_rate_output", _D.prune_rate_output,
                   "prune rate of the output layer (layer scope)", lower_bound=0.0,
                   upper_bound=1.0)
flags.DEFINE_enum("prune_scope", _D.prune_scope, list(SCOPES),
                  "rank weights within each layer or across all layers")
flags.DEFINE_enum("rewind_to", _D.rewind_to, list(REWIND_TARGETS),
                  "reinit_orig: reset to the random init (the lottery ticket), or to the "
                  "trained dense weights as the seed's released code does")
flags.DEFINE_integer("rewind_iteration", _D.rewind_iteration,
                     "rewind: iteration of the dense run whose weights pruned runs start "
                     "from", lower_bound=0)
flags.DEFINE_integer("seed", _D.seed, "random seed; fixed seeds give identical results",
                     lower_bound=0)
flags.DEFINE_string("devices", "", "comma-separated GPU indices to use (default: all)")
flags.DEFINE_bool("force", False, "delete the run folder if it exists and start over")
flags.DEFINE_bool("progress", True, "show a progress bar")

flags.register_validator("activation", lambda spec: _valid_activation(spec),
                         message="unknown or malformed --activation")
flags.register_multi_flags_validator(
    ["rewind_iteration", "train_iters"],
    lambda f: f["rewind_iteration"] < f["train_iters"],
    message="--rewind_iteration must be smaller than --train_iters")


def _valid_activation(spec):
  try:
    activations.validate(spec)
  except ValueError as e:
    raise flags.ValidationError(f"--activation={spec}: {e}") from None
  return True


def _select_devices(devices):
  if not devices:
    return
  import tensorflow as tf
  gpus = tf.config.list_physical_devices("GPU")
  try:
    wanted = [gpus[int(i)] for i in devices.split(",")]
  except (ValueError, IndexError):
    raise ValueError(f"--devices={devices}: this machine has {len(gpus)} GPU(s)") from None
  tf.config.set_visible_devices(wanted, "GPU")


def hparams_from_flags() -> Hparams:
  return Hparams(
      dataset=FLAGS.dataset, model=FLAGS.model, experiment=FLAGS.experiment,
      activation=FLAGS.activation, trials=FLAGS.trials, train_iters=FLAGS.train_iters,
      prune_iters=FLAGS.prune_iters, eval_every=FLAGS.eval_every,
      batch_size=FLAGS.batch_size,
      valid_size=FLAGS.valid_size or default_valid_size(FLAGS.dataset),
      learning_rate=FLAGS.learning_rate, l1_reg=FLAGS.l1_reg,
      label_smoothing=FLAGS.label_smoothing, prune_rate=FLAGS.prune_rate,
      prune_rate_output=FLAGS.prune_rate_output, prune_scope=FLAGS.prune_scope,
      rewind_to=FLAGS.rewind_to, rewind_iteration=FLAGS.rewind_iteration,
      attack=FLAGS.attack, attack_impl=FLAGS.attack_impl, eps=FLAGS.eps,
      pgd_step_size=FLAGS.pgd_step_size, pgd_steps=FLAGS.pgd_steps,
      adv_train=FLAGS.adv_train, adv_mix=FLAGS.adv_mix, seed=FLAGS.seed,
      data_dir=FLAGS.data_dir)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  try:
    _select_devices(FLAGS.devices)
    hparams = hparams_from_flags()
    dataset = load_dataset(hparams.dataset, hparams.data_dir, hparams.valid_size)
    if hparams.batch_size > len(dataset.x_train):
      raise ValueError(f"--batch_size={hparams.batch_size} is larger than the "
                       f"{len(dataset.x_train)} training images")
    runner = LotteryRunner(hparams, dataset, FLAGS.base_dir, force=FLAGS.force,
                           progress=FLAGS.progress)
    run_dir = runner.run()
  except (DataError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  logging.info("results in %s", run_dir)
  print(run_dir)
  return 0


if __name__ == "__main__":
  app.run(main)
