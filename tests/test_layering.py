"""The toolkit's layers: folders by kind, imports only downward (issue 25, docs/architecture.md).

Parses every import of the library (robust_sparse/ and the top-level folders
it holds in a checkout: custom_ops/, data/, attacks/, models/, experiments/,
analysis/) with `ast`, module level and inside functions alike, and checks:
no import cycle; no edge against the order

  custom_ops < core < nn < training, measure < data, attacks, models
             < experiments < analysis < the entry points (run_*, console, api);

an import inside a function only for a heavy or optional dependency, saying
so in a comment; and `robust_sparse.core` without TensorFlow, statically and
in a process where importing TensorFlow fails.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests import analysis_fixtures as fixtures
from tests.conftest import REPO

NAMESPACE = "robust_sparse"
FOLDERS = ("custom_ops", "data", "attacks", "models", "experiments", "analysis")
# Longest prefix wins. Same rank: either may import the other, cycles aside.
RANKS = {
    "robust_sparse.custom_ops": 0,
    # The namespace package itself: it only starts core's quiet start-up, and every
    # package imports it first.
    "robust_sparse": 1,
    "robust_sparse.core": 1,
    "robust_sparse.nn": 2,
    "robust_sparse.training": 3,
    "robust_sparse.measure": 3,
    "robust_sparse.data": 4,
    "robust_sparse.attacks": 4,
    "robust_sparse.models": 4,
    "robust_sparse.experiments": 5,
    "robust_sparse.analysis": 6,
    "robust_sparse.run_experiments": 7,
    "robust_sparse.run_analysis": 7,
    "robust_sparse.console": 7,
    "robust_sparse.api": 7,
}
# What an import inside a function must say about itself (same line, or the comments
# just above its block of imports).
REASONS = ("heavy", "optional", "lazily", "imported here", "imported late")
TENSORFLOW = ("tensorflow", "keras", "tf_keras")


def _modules():
  """{dotted name: path} of every library module."""
  found = {}
  for top in (NAMESPACE,) + FOLDERS:
    for directory, subdirs, names in os.walk(os.path.join(REPO, top)):
      subdirs[:] = [d for d in subdirs if d != "__pycache__"]
      for name in names:
        if not name.endswith(".py"):
          continue
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        dotted = dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted
        found[dotted if top == NAMESPACE else f"{NAMESPACE}.{dotted}"] = path
  return found


MODULES = _modules()


def _resolve(name):
  """The library module that `name` (a module, or a module's attribute) lives in."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name


def _imports(path):
  """[(target, line, inside a function, ast node)] of one file; target is the dotted module
  imported (a library module resolved to its file, or an external module's name)."""
  found = []

  def visit(node, inside):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import):
        for alias in child.names:
          target = _resolve(alias.name) if alias.name.startswith(NAMESPACE) else alias.name
          found.append((target, child.lineno, inside, child))
      elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
        for alias in child.names:
          full = f"{child.module}.{alias.name}"
          if child.module.startswith(NAMESPACE):
            target = full if full in MODULES else _resolve(child.module)
          else:
            target = child.module
          found.append((target, child.lineno, inside, child))
      visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.Lambda)))

  with open(path, encoding="utf-8") as f:
    visit(ast.parse(f.read(), path), False)
  return found


IMPORTS = {module: _imports(path) for module, path in MODULES.items()}


def _rank(module):
  prefix = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
  return RANKS[prefix]


def _edges():
  return {(module, target, line) for module, imports in IMPORTS.items()
          for target, line, _, _ in imports if target in MODULES and target != module}


def _cycles(edges):
  """The strongly connected components of more than one module (Tarjan)."""
  graph = {}
  for source, target, _ in edges:
    graph.setdefault(source, set()).add(target)
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def connect(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for other in sorted(graph.get(node, ())):
      if other not in index:
        connect(other)
        low[node] = min(low[node], low[other])
      elif other in on_stack:
        low[node] = min(low[node], index[other])
    if low[node] == index[node]:
      component = []
      while True:
        other = stack.pop()
        on_stack.discard(other)
        component.append(other)
        if other == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      connect(node)
  return components


def test_the_library_is_found():
  # A wrong root would make every other test here pass on nothing.
  for module in ("robust_sparse.core.hparams", "robust_sparse.nn.layers",
                 "robust_sparse.training.engine", "robust_sparse.measure.saturation",
                 "robust_sparse.experiments.runner", "robust_sparse.analysis.load"):
    assert module in MODULES
  assert len(_edges()) > 200


def test_no_import_cycles():
  assert _cycles(_edges()) == []


def test_cycle_finder_finds_a_cycle():
  assert _cycles({("a", "b", 1), ("b", "c", 1), ("c", "a", 1), ("c", "d", 1)}) == [
      ["a", "b", "c"]]


def test_imports_only_downward():
  upward = sorted(f"{source} ({_rank(source)}) imports {target} ({_rank(target)}), "
                  f"line {line}" for source, target, line in _edges()
                  if _rank(source) < _rank(target))
  assert upward == []


def _says_why(lines, node):
  """True if the import at `node` or the comments just above its block give a reason."""
  comments = [line.partition("#")[2] for line in lines[node.lineno - 1:node.end_lineno]]
  row = node.lineno - 2
  while row >= 0:
    line = lines[row].strip()
    if line.startswith("#"):
      comments.append(line)
    elif not line.startswith(("import ", "from ")):
      break
    row -= 1
  comments = " ".join(comments)
  return any(reason in comments.lower() for reason in REASONS)


def test_imports_inside_functions_are_heavy_or_optional_and_say_so():
  bad = []
  for module, imports in IMPORTS.items():
    with open(MODULES[module], encoding="utf-8") as f:
      lines = f.read().split("\n")
    for target, line, inside, node in imports:
      if not inside:
        continue
      if target.split(".")[0] in sys.stdlib_module_names:
        bad.append(f"{module}:{line}: the standard library's {target} belongs at the top")
      elif not _says_why(lines, node):
        bad.append(f"{module}:{line}: {target} inside a function without a comment saying "
                   f"why ({', '.join(REASONS)})")
  assert bad == []


def test_core_imports_no_tensorflow_nor_the_layers_above():
  bad = [f"{module}:{line}: {target}" for module, imports in IMPORTS.items()
         if _rank(module) == 1 for target, line, inside, _ in imports
         if not inside and (target.split(".")[0] in TENSORFLOW
                            or (target.startswith(NAMESPACE) and _rank(target) > 1))]
  assert bad == []


_WITHOUT_TENSORFLOW = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
          raise ImportError(name + " is not importable in this test")

    sys.meta_path.insert(0, NoTensorFlow())
    try:
      import tensorflow
      raise SystemExit("the block failed")
    except ImportError:
      pass
    from robust_sparse.analysis import load
    from robust_sparse.core import claims, files, hparams, registry, run_folder, specs, startup
    study = load.load_study(sys.argv[1])
    hp = hparams.Hparams(learning_rate=0.5)
    print(json.dumps(dict(
        runs=len(study.runs), problems=study.problems,
        defaults_match=load.hparam_defaults() == hparams.Hparams().to_dict(),
        run_dir=hp.run_dir("base"), tensorflow=[m for m in sys.modules
                                                if m.split(".")[0] in {blocked!r}])))
""")


def test_reading_runs_needs_no_tensorflow(tmp_path):
  base = str(tmp_path / "runs")
  fixtures.write_study(base, experiments=("reinit_orig",), attacks=("fgsm",))
  script = _WITHOUT_TENSORFLOW.format(blocked=TENSORFLOW)
  result = subprocess.run([sys.executable, "-c", script, base], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["runs"] == 2
  assert out["problems"] == []
  assert out["defaults_match"]
  assert out["tensorflow"] == []
  # The same folder as with TensorFlow importable (this process): a pure function.
  from robust_sparse.core.hparams import Hparams  # pylint: disable=import-outside-toplevel
  assert out["run_dir"] == Hparams(learning_rate=0.5).run_dir("base")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.count(".") == 1
                                          and os.path.basename(MODULES[m]) == "__init__.py"))
def test_each_package_says_what_lives_there(module):
  with open(MODULES[module], encoding="utf-8") as f:
    docstring = ast.get_docstring(ast.parse(f.read()))
  assert docstring and len(docstring.split()) >= 8, module


def test_tests_mirror_the_packages():
  """Every test file sits in the folder of the package it tests (tools/mirror_tests.py's map)."""
  result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "mirror_tests.py"), "--check",
                           REPO], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "0 change(s)" in result.stdout


def test_mirror_check_sees_a_misplaced_test(tmp_path):
  """The check above can fail: a test file outside its package's folder is a change to make."""
  subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
  os.makedirs(tmp_path / "tests")
  (tmp_path / "tests" / "__init__.py").write_text("")
  (tmp_path / "tests" / "test_layers.py").write_text("def test_x():\n  pass\n")
  subprocess.run(["git", "-C", str(tmp_path), "add", "-A"], check=True)
  result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "mirror_tests.py"), "--check",
                           str(tmp_path)], capture_output=True, text=True, check=False)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "tests/nn/test_layers.py" in result.stdout
