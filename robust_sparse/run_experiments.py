"""Runs the toolkit's experiments: lottery tickets, plain training, adversarially or not.

  python -m run_experiments --dataset=sklearn_digits --train_iters=300 \\
      --prune_iters=2 --eval_every=100 --trials=1 --attack=fgsm --adv_train

The flags are generated from the hyper-parameter dataclasses of
`robust_sparse.core.hparams` and keep the names and defaults of
robust-sparse-networks. Results go to a folder under --base_dir derived from
the hyper-parameters, printed as the last line of standard output; re-running
the same command resumes it, --force starts it over. Only this file reads FLAGS.
"""

import dataclasses
import signal
import sys

from robust_sparse.core import startup

startup.import_tensorflow()  # First: quietly, and without Keras' unused imports.

import tensorflow as tf  # noqa: E402  Already imported, quietly.
from absl import app, flags, logging  # noqa: E402

from robust_sparse.data import DataError, augment, default_valid_size, load_dataset  # noqa: E402
from robust_sparse.data.registry import default_data_dir  # noqa: E402
from robust_sparse.experiments import grid, launch  # noqa: E402
from robust_sparse.experiments.runner import DivergedError, Runner, check_distribution  # noqa: E402
from robust_sparse.models import MODELS  # noqa: E402
from robust_sparse.nn import activations  # noqa: E402
from robust_sparse.training import distribute  # noqa: E402
from robust_sparse.training.optimizers import split_optimizer  # noqa: E402
from robust_sparse.core import hparams as hparams_lib  # noqa: E402

FLAGS = flags.FLAGS

hparams_lib.define_flags(flags, FLAGS)
flags.DEFINE_string("base_dir", "./output", "base output directory for results and checkpoints")
flags.DEFINE_string("devices", "", "comma-separated GPU indices to use (default: all)")
flags.DEFINE_bool("force", False, "delete the run folder if it exists and start over")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_string("config", None, "a phd-lab JSON configuration grid (experiments/configs/): "
                    "one run per combination of its list values; flags given on the command "
                    "line override the grid's values")
flags.DEFINE_enum("launcher", "local", ["local", "ray"],
                  "local: this process trains every trial (several processes on one command "
                  "share the levels); ray: every trial is a Ray task (see experiments/launch.py)")
flags.DEFINE_string("ray_address", None, "--launcher=ray: a running cluster to join (auto: "
                    "the local one started with `ray start`); unset: a local Ray")
flags.DEFINE_float("gpus_per_trial", 0.0, "--launcher=ray: GPUs each trial's task asks for "
                   "(fractions share a GPU)", lower_bound=0.0)
flags.DEFINE_integer("max_retries", 2, "--launcher=ray: retries of a task whose worker died",
                     lower_bound=0)
flags.DEFINE_string("run_id", None, "with --config: the runs go under BASE_DIR/RUN_ID "
                    "(BASE_DIR: --base_dir if given, else the grid's logs_dir)")

# What --helpshort lists: the flags most runs set, then each experiment family's own
# (--helpfull: every flag).
KEY_FLAGS = (
    "dataset", "data_dir", "model", "activation", "experiment", "trials", "seed",
    "train_iters", "epochs", "eval_every", "batch_size", "augment", "optimizer",
    "learning_rate", "lr_schedule", "attack", "adv_train", "eps", "eval_attacks",
    # Lottery tickets and their controls.
    "prune_iters", "prune_rate", "prune_scope", "rewind_to", "rewind_iteration", "ticket_run",
    # Sharpness-aware training.
    "rho", "sparsity",
    # Measurements (saturation, probes, receptive fields, augmented flatness), ReLU reduction.
    "measure", "probes", "pretrained_run", "relu_count", "relu_sparsity",
)
for _name in KEY_FLAGS:
  flags.declare_key_flag(_name)
# The run being trained, for the line Ctrl-C prints.
_CURRENT_RUN = {"run_dir": None}


def _valid_activation(spec):
  try:
    activations.validate(spec)
  except ValueError as e:
    raise flags.ValidationError(f"--activation={spec}: {e}") from None
  return True


flags.register_validator("activation", _valid_activation,
                         message="unknown or malformed --activation")


def _valid_model(name):
  if name not in MODELS:
    try:
      MODELS.get(name)
    except ValueError as e:
      raise flags.ValidationError(f"--model={name}: {e}") from None
  return True


flags.register_validator("model", _valid_model, message="unknown --model")


def _valid_augment(spec):
  try:
    augment.validate(spec)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


flags.register_validator("augment", _valid_augment, message="unknown --augment")


def _valid_optimizer(name):
  try:
    split_optimizer(name)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


flags.register_validator("optimizer", _valid_optimizer, message="unknown --optimizer")
flags.register_multi_flags_validator(
    ["rewind_iteration", "train_iters"],
    lambda f: f["rewind_iteration"] < f["train_iters"],
    message="--rewind_iteration must be smaller than --train_iters")


def _select_devices(devices):
  if not devices:
    return
  gpus = tf.config.list_physical_devices("GPU")
  try:
    indices = [int(i) for i in devices.split(",")]
    if min(indices) < 0:
      raise IndexError
    wanted = [gpus[i] for i in indices]
  except (ValueError, IndexError):
    raise ValueError(f"--devices={devices}: this machine has {len(gpus)} GPU(s)") from None
  tf.config.set_visible_devices(wanted, "GPU")


def hparams_from_flags() -> hparams_lib.Hparams:
  """The hyper-parameters the flags describe.

  Raises:
    ValueError: flags that contradict each other, naming them.
  """
  if FLAGS.epochs is not None and FLAGS["train_iters"].present:
    raise ValueError("--epochs and --train_iters both set the training length; give one")
  # Unset --data_dir: $ROBUST_SPARSE_DATA_DIR (recorded in hparams.json; never hashed).
  data_dir = {} if FLAGS["data_dir"].present or not default_data_dir() else {
      "data_dir": default_data_dir()}
  return hparams_lib.from_flags(
      FLAGS, fallbacks={"valid_size": default_valid_size(FLAGS.dataset)}
      if FLAGS.valid_size is None else None, **data_dir)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  try:
    _select_devices(FLAGS.devices)
    hparams = hparams_from_flags()
    check_distribution(hparams)
    if hparams.distribution == "mirrored":  # Before TensorFlow starts its devices.
      distribute.configure_devices(hparams.cpu_replicas)
    if FLAGS.launcher == "ray" and FLAGS.force:
      raise ValueError("--force with --launcher=ray: delete the run folders first instead")
    if hparams.deterministic:
      tf.config.experimental.enable_op_determinism()
    if FLAGS.config:
      return _run_grid(hparams)
    if FLAGS.run_id:
      raise ValueError("--run_id names the runs of a --config grid; give --config")
    dataset = load_dataset(hparams.dataset, hparams.data_dir, hparams.valid_size,
                           resolution=hparams.resolution)
    runner = Runner(hparams, dataset, FLAGS.base_dir, force=FLAGS.force,
                    progress=FLAGS.progress)
    _CURRENT_RUN["run_dir"] = runner.run_dir
    if FLAGS.launcher == "ray":  # The tasks train; this process only finishes the run.
      _launch_with_ray([(hparams, FLAGS.base_dir)])
    run_dir = runner.run()
  except (DataError, ValueError, OSError, DivergedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  logging.info("results in %s", run_dir)
  print(run_dir)
  if runner.summary:
    print(runner.summary)
  return 0


def _run_grid(base: hparams_lib.Hparams) -> int:
  """Runs every combination of --config (finished ones are skipped); prints each folder.

  Raises:
    ValueError, DataError, OSError, DivergedError: as a single run does.
  """
  if not FLAGS.run_id:
    raise ValueError("--config needs --run_id, the name of this set of runs")
  runs = grid.grid_runs(FLAGS.config, FLAGS.run_id,
                        FLAGS.base_dir if FLAGS["base_dir"].present else None)
  explicit = {field.name for field in dataclasses.fields(hparams_lib.Hparams)
              if FLAGS[field.name].present}
  jobs = [(dataclasses.replace(base, **{k: v for k, v in overrides.items()
                                        if k not in explicit}), base_dir)
          for overrides, base_dir in runs]
  if FLAGS.launcher == "ray":
    _launch_with_ray(jobs)
  datasets = {}
  for hparams, base_dir in jobs:
    key = (hparams.dataset, hparams.valid_size, hparams.resolution)
    if key not in datasets:
      datasets[key] = load_dataset(hparams.dataset, hparams.data_dir, hparams.valid_size,
                                   resolution=hparams.resolution)
    runner = Runner(hparams, datasets[key], base_dir, force=FLAGS.force,
                    progress=FLAGS.progress)
    _CURRENT_RUN["run_dir"] = runner.run_dir
    run_dir = runner.run()
    logging.info("results in %s", run_dir)
    print(run_dir, flush=True)
  return 0


def _launch_with_ray(jobs):
  """`--launcher=ray`: every trial of `jobs` as a Ray task (experiments/launch.py)."""
  launch.run_trials(jobs, address=FLAGS.ray_address, gpus_per_trial=FLAGS.gpus_per_trial,
                    max_retries=FLAGS.max_retries)


def interrupted_line() -> str:
  """What Ctrl-C prints: how to resume (finished levels are kept, the level in progress
  continues from its last evaluation's checkpoint)."""
  where = _CURRENT_RUN["run_dir"]
  return ("interrupted: run the same command again to resume"
          + (f" {where}" if where else "") + " from its last checkpoint")


_SIGINT_SEEN = []


def _on_sigint(signum, frame):
  # Remembered: a KeyboardInterrupt raised inside TensorFlow's C++ calls can surface as
  # another exception (SystemError: "bad argument to internal function").
  del signum, frame
  _SIGINT_SEEN.append(True)
  raise KeyboardInterrupt


if __name__ == "__main__":
  signal.signal(signal.SIGINT, _on_sigint)
  try:
    app.run(main)
  except KeyboardInterrupt:
    print(f"\n{interrupted_line()}", file=sys.stderr)
    startup.exit_now(130)  # 128 + SIGINT, as a shell reports it.
  except Exception:  # pylint: disable=broad-except
    if not _SIGINT_SEEN:
      raise
    print(f"\n{interrupted_line()}", file=sys.stderr)
    startup.exit_now(130)
  except SystemExit as done:
    if not done.code:  # Finished: skip the interpreter's slow teardown.
      startup.exit_now(0)
    raise
