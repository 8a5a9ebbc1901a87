"""Sorts robust_sparse/'s flat modules into folders by kind (issue 25, item 1).

  python tools/restructure.py [--check] [ROOT]

`robust_sparse/` held 28 flat modules of four kinds; this script moves them
into sub-packages (MOVES below is the whole map, old module -> new module) and
rewrites every reference to them over the whole tree (tracked and untracked,
not ignored: the library, tests, benchmarks, tools, docs, run_sh, the README):

  * `from robust_sparse import layers, files as f`  ->
    `from robust_sparse.core import files as f` / `from robust_sparse.nn import layers`
    (one line per new parent package, in the statement's place)
  * `from robust_sparse.layers import X`, `import robust_sparse.layers`,
    `robust_sparse.layers.X` anywhere (mock.patch targets, `python -m` paths,
    docstrings, Markdown)  ->  the module's new dotted name
  * `robust_sparse/layers.py` (paths in prose and code)  ->  its new path
  * each new package gets an `__init__.py` (its docstring says what lives there
    and what it may import; written only when missing, so hand edits stay)
  * pyproject.toml's package list gains the new packages

The modules move with `git mv` (history follows them). Idempotent: a second
run changes nothing, so it can be re-run on a newer tree. Prints every change;
`--check` only prints them and exits 1 if there are any.
"""

import argparse
import os
import re
import subprocess
import sys

NAMESPACE = "robust_sparse"
THIS_FILE = "tools/restructure.py"
# The precedent: its docstring describes the previous move, as it was.
LEAVE_ALONE = {THIS_FILE, "tools/namespace_imports.py"}

# old module (under robust_sparse.) -> new module (under robust_sparse.).
MOVES = {
    # core: pure Python, no TensorFlow.
    "registry": "core.registry",
    "specs": "core.specs",
    "files": "core.files",
    "claims": "core.claims",
    "startup": "core.startup",
    "hparams": "core.hparams",
    "seed_defaults": "core.seed_defaults",
    # nn: Keras building blocks.
    "layers": "nn.layers",
    "activations": "nn.activations",
    "sparsity_modules": "nn.sparsity_modules",
    "relu_reduction": "nn.relu_masks",
    "pruning": "nn.pruning",
    "keras_pruning": "nn.keras_pruning",
    # training: the step library, its loops and what they need.
    "steps": "training.steps",
    "engine": "training.engine",
    "compilation": "training.compilation",
    "keras_model": "training.keras_model",
    "optimizers": "training.optimizers",
    "schedules": "training.schedules",
    "distribute": "training.distribute",
    "arrays": "training.arrays",
    "lottery": "training.lottery",
    "tensorboard": "training.tensorboard",
    "sharpness": "training.sharpness.sam",
    "ssam": "training.sharpness.ssam",
    "sparse_perturbation": "training.sharpness.sparse_perturbation",
    # measure: what the runs measure about a network.
    "saturation": "measure.saturation",
    "activation_stats": "measure.activation_stats",
    "probes": "measure.probes",
    "receptive_field": "measure.receptive_field",
    "flatness": "measure.flatness",
    "measurements": "measure.measurements",
    "measurement_callback": "measure.measurement_callback",
}

PACKAGES = {
    "core": '''"""Foundations every other part of the toolkit stands on: pure Python, no TensorFlow.

The registry type, the spec syntax, crash-safe files, level claims, the quiet
start-up, the hyper-parameters (with the run-folder hash) and the seeds'
defaults. Reading a run's hyper-parameters never imports TensorFlow
(tests/test_layering.py checks it).

May import: the standard library, NumPy, absl; nothing else of the toolkit.
"""
''',
    "nn": '''"""Keras building blocks: masked layers, activations, sparsity modules, ReLU masks, pruning.

Layers are serializable and survive a `.keras` save and reload; their
registered names (`robust_sparse>MaskedDense`, ...) do not depend on this
folder, so files saved before the move still load.

May import: `robust_sparse.core`, `robust_sparse.custom_ops`, Keras, TensorFlow.
"""
''',
    "training": '''"""The training machinery: the step library, the compiled loop, the Keras front-end.

Steps composed from small functions over tensors (steps.py), the engine that
runs k of them per compiled call (engine.py), its XLA choice (compilation.py),
`RobustModel` (keras_model.py), optimizers, schedules, `tf.distribute`
(distribute.py), shared arrays, the lottery-ticket callback, TensorBoard
files, and `sharpness/` (SAM, ASAM, SSAM).

May import: `robust_sparse.core`, `robust_sparse.nn`, `robust_sparse.measure`,
`robust_sparse.custom_ops`.
"""
''',
    "training/sharpness": '''"""Sharpness-aware minimisation: SAM and ASAM (sam.py), Sparse SAM's masks (ssam.py,
sparse_perturbation.py).

May import: `robust_sparse.core`, `robust_sparse.nn`, the rest of `robust_sparse.training`.
"""
''',
    "measure": '''"""Measurements of a network: saturation, activation sparsity, probes, receptive fields,
flatness, and the callbacks that feed them in the runner and in a user's `fit`.

May import: `robust_sparse.core`, `robust_sparse.nn`, `robust_sparse.custom_ops`.
"""
''',
}

_OLD = "|".join(sorted(MOVES, key=len, reverse=True))
# `robust_sparse.layers` as a dotted name, not `robust_sparse.analysis.layers`.
_DOTTED = re.compile(rf"(?<![\w.]){NAMESPACE}\.({_OLD})(?!\w)")
_PATH = re.compile(rf"(?<![\w/.]){NAMESPACE}/({_OLD})\.py\b")
_FROM_NS = re.compile(rf"^([ \t]*)from {NAMESPACE} import[ \t]+", re.M)
WIDTH = 100


def _git_files(root):
  out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=root, check=True, capture_output=True).stdout.decode()
  return sorted({path for path in out.split("\0")
                 if path and os.path.isfile(os.path.join(root, path))})


def _closing_paren(text, start):
  for match in re.finditer(r"#[^\n]*|\)", text[start:]):
    if match.group(0) == ")":
      return start + match.start()
  raise ValueError(f"no closing parenthesis after: {text[start:start + 80]!r}")


def _line(indent, module, names, comment):
  """`from module import names  # comment`, wrapped in parentheses past WIDTH."""
  comment = f"  {comment}" if comment else ""
  one = f"{indent}from {module} import {', '.join(names)}"
  if len(one + comment) <= WIDTH or len(names) == 1:
    return one + comment
  head = f"{indent}from {module} import ("
  lines, line = [], head
  for i, name in enumerate(names):
    piece = name + ("," if i < len(names) - 1 else ")")
    if line.strip() and line != head and len(line) + 1 + len(piece) > WIDTH:
      lines.append(line)
      line = " " * len(head) + piece
    else:
      line += piece if line == head else " " + piece
  lines.append(line)
  lines[0] += comment
  return "\n".join(lines)


def _split_from_namespace(text):
  """`from robust_sparse import a, b as c` naming moved modules: one line per new parent."""
  out, position = [], 0
  for match in _FROM_NS.finditer(text):
    if match.start() < position:
      continue
    indent, rest = match.group(1), match.end()
    if text.startswith("(", rest):
      close = _closing_paren(text, rest)
      end = text.find("\n", close)
      end = len(text) if end < 0 else end
      inside, after = text[rest + 1:close], text[close + 1:end]
    else:
      end = text.find("\n", rest)
      end = len(text) if end < 0 else end
      inside, hash_, after = text[rest:end].partition("#")
      after = hash_ + after
    comments = re.findall(r"#[^\n]*", inside) + re.findall(r"#[^\n]*", after)
    names = [" ".join(n.split()) for n in re.sub(r"#[^\n]*", "", inside).split(",")]
    names = [n for n in names if n]
    if not any(n.split(" ")[0] in MOVES for n in names):
      continue
    groups = {}
    for name in names:
      leaf, _, alias = name.partition(" as ")
      leaf = leaf.strip()
      if leaf in MOVES:
        parent, _, new_leaf = f"{NAMESPACE}.{MOVES[leaf]}".rpartition(".")
        alias = alias.strip() or (leaf if new_leaf != leaf else "")
        groups.setdefault(parent, []).append(new_leaf + (f" as {alias}" if alias else ""))
      else:
        groups.setdefault(NAMESPACE, []).append(name)
    comment = "  ".join(c.strip() for c in comments)
    # A `noqa` holds for its own line only: every line of the split keeps it.
    lines = [_line(indent, parent, group,
                   comment if i == len(groups) - 1 or "noqa" in comment else "")
             for i, (parent, group) in enumerate(groups.items())]
    out.append(text[position:match.start()])
    out.append("\n".join(lines))
    position = end
  out.append(text[position:])
  return "".join(out)


def rewrite(text):
  """Every rewrite of a file's text (Python, Markdown, shell, TOML)."""
  text = _split_from_namespace(text)
  text = _DOTTED.sub(lambda m: f"{NAMESPACE}.{MOVES[m.group(1)]}", text)
  return _PATH.sub(lambda m: f"{NAMESPACE}/{MOVES[m.group(1)].replace('.', '/')}.py", text)


def _pyproject(text):
  """The new packages in pyproject.toml's list, after "robust_sparse"."""
  missing = [f"{NAMESPACE}.{p.replace('/', '.')}" for p in PACKAGES
             if f'"{NAMESPACE}.{p.replace("/", ".")}"' not in text]
  if not missing or f'  "{NAMESPACE}",\n' not in text:
    return text
  lines = "".join(f'  "{name}",\n' for name in missing)
  return text.replace(f'  "{NAMESPACE}",\n', f'  "{NAMESPACE}",\n' + lines, 1)


def move_modules(root, dry_run):
  changes = []
  for package, docstring in PACKAGES.items():
    init = os.path.join(root, NAMESPACE, package, "__init__.py")
    if not os.path.isfile(init):
      changes.append(f"{NAMESPACE}/{package}/__init__.py: new")
      if not dry_run:
        os.makedirs(os.path.dirname(init), exist_ok=True)
        with open(init, "w", encoding="utf-8") as f:
          f.write(docstring)
        subprocess.run(["git", "add", init], cwd=root, check=True)
  for old, new in MOVES.items():
    source = os.path.join(NAMESPACE, f"{old}.py")
    target = os.path.join(NAMESPACE, *new.split(".")) + ".py"
    if not os.path.isfile(os.path.join(root, source)):
      continue
    if os.path.exists(os.path.join(root, target)):
      sys.exit(f"error: both {source} and {target} exist; merge them by hand")
    changes.append(f"{source} -> {target}")
    if dry_run:
      continue
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", source], cwd=root,
                             capture_output=True).returncode == 0
    if tracked:
      subprocess.run(["git", "mv", source, target], cwd=root, check=True)
    else:
      os.rename(os.path.join(root, source), os.path.join(root, target))
  return changes


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python tools/restructure.py",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("root", nargs="?",
                      default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  parser.add_argument("--check", action="store_true", help="print the changes, write nothing")
  args = parser.parse_args(argv)
  root = os.path.abspath(args.root)
  changes = move_modules(root, args.check)
  for path in _git_files(root):
    if path in LEAVE_ALONE or not path.endswith((".py", ".md", ".sh", ".toml", ".txt", ".cfg")):
      continue
    full = os.path.join(root, path)
    with open(full, encoding="utf-8") as f:
      old = f.read()
    new = rewrite(old)
    if path == "pyproject.toml":
      new = _pyproject(new)
    if new == old:
      continue
    changed = sum(a != b for a, b in zip(old.splitlines(), new.splitlines()))
    changes.append(f"{path}: ~{max(changed, 1)} line(s)")
    if not args.check:
      with open(full, "w", encoding="utf-8") as f:
        f.write(new)
  for line in changes:
    print(line)
  print(f"{len(changes)} change(s)" + (" (not written: --check)" if args.check else ""))
  return 1 if args.check and changes else 0


if __name__ == "__main__":
  sys.exit(main())
