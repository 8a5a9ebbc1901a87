"""Sorts tests/ into folders that mirror the packages they test (issue 25, item 6).

  python tools/mirror_tests.py [--check] [ROOT]

`tests/test_<x>.py` moves (with `git mv`) to `tests/<package>/test_<x>.py`,
where <package> is the folder of the code it tests: `core`, `nn`, `training`,
`measure` (robust_sparse's sub-packages), `data`, `attacks`, `models`,
`experiments`, `analysis` (the top-level packages) or `benchmarks`. Tests of
the whole toolkit (the README's commands, installing, the public API, the
import layering, the command line) stay in `tests/`, beside `conftest.py` and
the shared helpers (`cli_batch.py`, `analysis_fixtures.py`). `HOMES` below is
the whole map; a test file it does not name stops the script, so a new test
gets a home on purpose.

Every reference is rewritten over the tracked and untracked (not ignored)
files: `tests.test_x` (imports, `python -m`) -> `tests.<package>.test_x`,
`tests/test_x.py` -> `tests/<package>/test_x.py`, and a moved file's own
repository root (`os.path.dirname` of its folder) gains one level. Each new
folder gets an `__init__.py`. Idempotent; `--check` prints what it would do and
exits 1 if anything.
"""

import argparse
import os
import re
import subprocess
import sys

THIS_FILE = "tools/mirror_tests.py"
STAY = {"test_readme", "test_install", "test_public_api", "test_layering", "test_cli_usability"}
HOMES = {
    "core": ["test_hparams", "test_filing", "test_registry", "test_specs", "test_startup"],
    "nn": ["test_layers", "test_activations", "test_custom_ops", "test_sparsity_modules",
           "test_pruning", "test_relu_reduction", "test_masked_fit", "test_scores"],
    "training": ["test_engine", "test_steps", "test_optimizers", "test_schedules",
                 "test_sharpness", "test_ssam", "test_distribute", "test_compilation",
                 "test_arrays", "test_tensorboard", "test_drop_last", "test_adversarial_losses",
                 "test_keras_model"],
    "measure": ["test_saturation", "test_probes", "test_receptive_field", "test_flatness",
                "test_activation_stats", "test_measure", "test_activation_measure"],
    "attacks": ["test_attacks", "test_apgd", "test_fab", "test_square", "test_autoattack",
                "test_attack_specs"],
    "data": ["test_datasets", "test_augment"],
    "models": ["test_models", "test_model_zoo", "test_vit", "test_torch_batch_norm"],
    "experiments": ["test_experiments", "test_run_experiments", "test_relu_experiments",
                    "test_sparsify_finetune", "test_augmented_flatness_experiment",
                    "test_controls_and_evaluation", "test_grid", "test_ray_launcher",
                    "test_work_sharing", "test_eps_sweep", "test_hydra", "test_level_log",
                    "test_runner"],
    "analysis": ["test_analysis", "test_analysis_labels", "test_activation_analysis",
                 "test_masking_analysis", "test_figure_ticks", "test_hydra_phases"],
    "benchmarks": ["test_bench_jobs", "test_bench_models", "test_bench_protocols",
                   "test_fidelity"],
}
WHAT = {
    "core": "robust_sparse.core: hyper-parameters, the run folder, files, registries",
    "nn": "robust_sparse.nn: masked layers, activations, pruning, ReLU masks",
    "training": "robust_sparse.training: steps, the engine, optimizers, schedules, sharpness",
    "measure": "robust_sparse.measure: saturation, probes, receptive fields, flatness",
    "attacks": "the attacks",
    "data": "the data sets",
    "models": "the model zoo",
    "experiments": "the experiments and the runner",
    "analysis": "the analysis",
    "benchmarks": "the benchmarks and the fidelity checks",
}
ROOT_EXPR = "os.path.dirname(os.path.dirname(os.path.abspath(__file__)))"


def _files(root):
  out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                       cwd=root, capture_output=True, text=True, check=True).stdout.split()
  return [f for f in out if os.path.exists(os.path.join(root, f))]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("root", nargs="?", default=".")
  parser.add_argument("--check", action="store_true")
  args = parser.parse_args()
  root = os.path.abspath(args.root)
  home = {name: package for package, names in HOMES.items() for name in names}
  present = sorted(f[:-3] for f in os.listdir(os.path.join(root, "tests"))
                   if f.startswith("test_") and f.endswith(".py"))
  homeless = [name for name in present if name not in home and name not in STAY]
  if homeless:
    sys.exit(f"tests without a home in {THIS_FILE}'s HOMES: {', '.join(homeless)}")
  moves = {name: home[name] for name in present if name in home}
  changes = []
  # References first (the files still at their old paths), then the moves.
  for path in _files(root):
    if path == THIS_FILE or not path.endswith((".py", ".md", ".sh", ".toml", ".cfg", ".txt",
                                               ".ini", ".yaml", ".yml")):
      continue
    full = os.path.join(root, path)
    with open(full, encoding="utf-8") as f:
      text = f.read()
    new = text
    for name, package in moves.items():
      new = re.sub(rf"\btests\.{name}\b", f"tests.{package}.{name}", new)
      new = re.sub(rf"\btests/{name}\.py\b", f"tests/{package}/{name}.py", new)
    stem = os.path.basename(path)[:-3]
    if path.startswith("tests/") and path.count("/") == 1 and stem in moves:
      new = new.replace(ROOT_EXPR, f"os.path.dirname({ROOT_EXPR})")
    if new != text:
      changes.append(f"rewrite {path}")
      if not args.check:
        with open(full, "w", encoding="utf-8") as f:
          f.write(new)
  for package in sorted(set(moves.values())):
    init = os.path.join(root, "tests", package, "__init__.py")
    if not os.path.exists(init):
      changes.append(f"create tests/{package}/__init__.py")
      if not args.check:
        os.makedirs(os.path.dirname(init), exist_ok=True)
        with open(init, "w", encoding="utf-8") as f:
          f.write(f'"""Tests of {WHAT[package]}."""\n')
  for name, package in moves.items():
    source, target = f"tests/{name}.py", f"tests/{package}/{name}.py"
    changes.append(f"move {source} -> {target}")
    if not args.check:
      subprocess.run(["git", "add", source], cwd=root, check=True)
      subprocess.run(["git", "mv", source, target], cwd=root, check=True)
  for line in changes:
    print(line)
  print(f"{len(changes)} change(s){' (not written: --check)' if args.check else ''}")
  if args.check and changes:
    sys.exit(1)


if __name__ == "__main__":
  main()
