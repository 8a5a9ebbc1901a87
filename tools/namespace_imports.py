"""Puts the toolkit's packages under the one namespace `robust_sparse` (issue 24, item 2).

  python tools/namespace_imports.py [--check] [ROOT]

The repository keeps its top-level folders (attacks/, data/, models/,
experiments/, analysis/, custom_ops/), but nothing imports them by those
generic names any more, which would shadow, or be shadowed by, a user's own
`data/` or `models.py`: every import goes through `robust_sparse`
(`robust_sparse/__init__.py` finds the folders in a source checkout,
pyproject.toml maps them in an installed copy). This script makes the
mechanical part of that change over the whole tree (tracked and untracked,
not ignored), so it can be re-run on a newer tree:

  * `from attacks.pgd import pgd`  ->  `from robust_sparse.attacks.pgd import pgd`
  * `import data` / `import data as d`  ->  `from robust_sparse import data [as d]`
  * `import models.vit`  ->  `from robust_sparse.models import vit`
  * `import run_experiments`  ->  `from robust_sparse import run_experiments`
  * strings naming a module or a registry: `"data.DATASETS"`, `"custom_ops.build"`,
    `import_module("models")`  ->  `"robust_sparse.data.DATASETS"`, ...
  * `python -m custom_ops.build` (docstrings, messages, docs) -> `python -m
    robust_sparse.custom_ops.build`
  * the same import lines in the Markdown files' code (fenced or indented)
  * the bodies of run_experiments.py / run_analysis.py move into the package
    (robust_sparse/run_experiments.py, robust_sparse/run_analysis.py, so the
    wheel holds them and its console scripts run them); the top-level files
    become shims, so `python -m run_experiments` keeps working.

benchmarks/ and tests/ stay top-level packages (they are not installed); their
own imports (`from tests.conftest import REPO`) are left alone, and so is an
import line marked `# namespace: keep` (a test's user script importing its own
`models.py`). Idempotent:
a second run changes nothing. Prints every change; `--check` only prints them
and exits 1 if there are any.
"""

import argparse
import difflib
import os
import re
import subprocess
import sys

NAMESPACE = "robust_sparse"
PACKAGES = ("attacks", "data", "models", "experiments", "analysis", "custom_ops")
COMMANDS = ("run_experiments", "run_analysis")
THIS_FILE = "tools/namespace_imports.py"
# Seen by robust_sparse/__init__.py and this script: a shim is never moved again.
SHIM_MARKER = "# A shim: the command's body is robust_sparse/{name}.py."

SHIM = '''"""`python -m {name}`: robust_sparse/{name}.py, run from the repository root.

The body lives inside the `robust_sparse` package so that an installed copy
holds it too (the console script `{script}`); this file keeps the
repository's command as it was.
"""
{marker}

import runpy
import sys

if __name__ == "__main__":
  runpy.run_module("robust_sparse.{name}", run_name="__main__", alter_sys=True)
else:  # `import {name}` is the package's module itself, never a second copy of its flags.
  from robust_sparse import {name} as _module
  sys.modules[__name__] = _module
'''
SCRIPTS = {"run_experiments": "robust-sparse-run", "run_analysis": "robust-sparse-analyze"}

_PKG = "|".join(PACKAGES)
_FROM = re.compile(rf"^(\s*)from ({_PKG}|{'|'.join(COMMANDS)})((?:\.\w+)*) import\b", re.M)
_IMPORT = re.compile(r"^([ \t]*)import ([\w. ,]+?)([ \t]*(?:#.*)?)$", re.M)
_PYTHON_M = re.compile(rf"(python3? -m )({_PKG})\.")
_IMPORT_MODULE = re.compile(rf"(import_module\()([\"'])({_PKG})\2")
_STRING = re.compile(rf"([\"'])({_PKG})((?:\.\w+)+)(:\w+)?\1")
# An import line holding this comment is left alone (a test's own `models.py`).
KEEP = "namespace: keep"
# The tree's line length; a rewritten import that outgrows it is wrapped.
WIDTH = 100
_OURS = re.compile(rf"^([ \t]*)from ({NAMESPACE}(?:\.\w+)*) import[ \t]+", re.M)


def _git_files(root):
  out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=root, check=True, capture_output=True).stdout.decode()
  return sorted({path for path in out.split("\0")
                 if path and os.path.isfile(os.path.join(root, path))})


def _names_a_module(root, package, rest):
  """True if `package.rest` names a module of the package or one of its registries."""
  first = rest.lstrip(".").split(".")[0]
  return (os.path.isfile(os.path.join(root, package, first + ".py"))
          or os.path.isdir(os.path.join(root, package, first))
          or re.fullmatch(r"[A-Z][A-Z0-9_]*", first) is not None)


def _rewrite_import(match, warnings, path, text):
  indent, names, tail = match.groups()
  items = [item.strip() for item in names.split(",")]
  ours = [item for item in items if item.split(" ")[0].split(".")[0] in PACKAGES + COMMANDS]
  if not ours:
    return match.group(0)
  lines = []
  rest = [item for item in items if item not in ours]
  if rest:
    lines.append(f"import {', '.join(rest)}")
  for item in ours:
    dotted, _, alias = item.partition(" as ")
    parent, _, leaf = f"{NAMESPACE}.{dotted.strip()}".rpartition(".")
    lines.append(f"from {parent} import {leaf}" + (f" as {alias.strip()}" if alias else ""))
    if "." in dotted and not alias:
      # `import models.vit` bound `models`; the new line binds `vit`.
      head = dotted.split(".")[0]
      body = _IMPORT.sub("", _FROM.sub("", text))
      if re.search(rf"(?<![\w.]){head}\.\w", body):
        warnings.append(f"{path}: `import {dotted}` rewritten, but the file uses `{head}.`:"
                        " check it by hand")
  lines[-1] += tail
  return "\n".join(indent + line for line in lines)


def _pack(words, first, indent, width=WIDTH):
  """`words` joined by ", " and closed by ")", on lines of at most `width` (None if a
  word cannot fit): the first line starts with `first`, the others with `indent`."""
  lines, line, fresh = [], first, True
  for i, word in enumerate(words):
    piece = word + ("," if i < len(words) - 1 else ")")
    if not fresh and len(line) + 1 + len(piece) > width:
      lines.append(line)
      line, fresh = indent, True
    line += piece if fresh else " " + piece
    fresh = False
    if len(line) > width:
      return None
  lines.append(line)
  return lines


def _wrap(indent, module, names, comment):
  """`from module import names  # comment` within WIDTH, wrapped as the tree wraps."""
  comment = f"  {comment}" if comment else ""
  head = f"{indent}from {module} import ("
  lines = _pack(names, head, " " * len(head))
  if lines and len(lines[0] + comment) <= WIDTH:
    lines[0] += comment
    return "\n".join(lines)
  lines = _pack(names, indent + " " * 4, indent + " " * 4)  # Hanging: the comment first.
  if lines is None:  # A name longer than a line: leave it long.
    return f"{indent}from {module} import {', '.join(names)}{comment}"
  return "\n".join([head + comment, *lines])


def _closing_paren(text, start):
  """The index of the ")" that closes the "(" at `start`, skipping comments."""
  for match in re.finditer(r"#[^\n]*|\)", text[start:]):
    if match.group(0) == ")":
      return start + match.start()
  raise ValueError(f"no closing parenthesis after: {text[start:start + 80]!r}")


def _reflow(text):
  """Wraps every `from robust_sparse... import` statement that has a line over WIDTH."""
  out, position = [], 0
  for match in _OURS.finditer(text):
    if match.start() < position:
      continue
    indent, module = match.group(1), match.group(2)
    rest = match.end()
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
    if all(len(line) <= WIDTH for line in text[match.start():end].split("\n")):
      continue
    comments = re.findall(r"#[^\n]*", inside) + re.findall(r"#[^\n]*", after)
    names = [" ".join(name.split()) for name in re.sub(r"#[^\n]*", "", inside).split(",")]
    out.append(text[position:match.start()])
    out.append(_wrap(indent, module, [name for name in names if name],
                     "  ".join(comment.strip() for comment in comments)))
    position = end
  out.append(text[position:])
  return "".join(out)


def _kept(match):
  """True for an import on a line marked `# namespace: keep` (a user's own `models`)."""
  end = match.string.find("\n", match.start())
  return KEEP in match.string[match.start():None if end < 0 else end]


def rewrite_python_lines(text, warnings=None, path=""):
  """The import-line rewrites, on Python source (or a code block)."""
  warnings = [] if warnings is None else warnings
  text = _FROM.sub(lambda m: m.group(0) if _kept(m) else
                   f"{m.group(1)}from {NAMESPACE}.{m.group(2)}{m.group(3)} import", text)
  text = _IMPORT.sub(lambda m: m.group(0) if _kept(m) else
                     _rewrite_import(m, warnings, path, text), text)
  return _reflow(text)


def rewrite_python(root, text, warnings=None, path=""):
  """Every rewrite of a Python file."""
  text = rewrite_python_lines(text, warnings, path)
  text = _IMPORT_MODULE.sub(rf"\1\2{NAMESPACE}.\3\2", text)
  text = _STRING.sub(
      lambda m: (f"{m.group(1)}{NAMESPACE}.{m.group(2)}{m.group(3)}{m.group(4) or ''}{m.group(1)}"
                 if _names_a_module(root, m.group(2), m.group(3)) else m.group(0)), text)
  return _PYTHON_M.sub(rf"\1{NAMESPACE}.\2.", text)


def rewrite_markdown(text, warnings=None, path=""):
  """Import lines (fenced or indented code: a prose line is never just an import), and
  `python -m package.module` anywhere."""
  text = rewrite_python_lines(text, warnings, path)
  return _PYTHON_M.sub(rf"\1{NAMESPACE}.\2.", text)


def move_commands(root, dry_run):
  """Moves run_experiments.py / run_analysis.py into the package; writes the shims."""
  changes = []
  for name in COMMANDS:
    top = os.path.join(root, f"{name}.py")
    inside = os.path.join(root, NAMESPACE, f"{name}.py")
    if not os.path.isfile(top):
      continue
    marker = SHIM_MARKER.format(name=name)
    shim = SHIM.format(name=name, script=SCRIPTS[name], marker=marker)
    current = open(top).read()
    if marker in current:
      if current != shim:
        changes.append(f"{name}.py: shim updated")
        if not dry_run:
          open(top, "w").write(shim)
      continue
    if os.path.exists(inside):
      sys.exit(f"error: both {name}.py (not a shim) and {NAMESPACE}/{name}.py exist; "
               "merge them by hand")
    changes.append(f"{name}.py -> {NAMESPACE}/{name}.py, {name}.py is now a shim")
    if dry_run:
      continue
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", f"{name}.py"], cwd=root,
                             capture_output=True).returncode == 0
    if tracked:
      subprocess.run(["git", "mv", f"{name}.py", f"{NAMESPACE}/{name}.py"], cwd=root,
                     check=True)
    else:
      os.rename(top, inside)
    open(top, "w").write(shim)
  return changes


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python tools/namespace_imports.py",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("root", nargs="?",
                      default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  parser.add_argument("--check", action="store_true", help="print the changes, write nothing")
  args = parser.parse_args(argv)
  root = os.path.abspath(args.root)
  changes = move_commands(root, args.check)
  warnings = []
  shims = {f"{name}.py" for name in COMMANDS}
  for path in _git_files(root):
    if path == THIS_FILE or path in shims:
      continue
    if path.endswith(".py"):
      rewrite = lambda text, p=path: rewrite_python(root, text, warnings, p)  # noqa: E731
    elif path.endswith(".md"):
      rewrite = lambda text, p=path: rewrite_markdown(text, warnings, p)  # noqa: E731
    elif path.endswith(".sh"):
      rewrite = lambda text: _PYTHON_M.sub(rf"\1{NAMESPACE}.\2.", text)  # noqa: E731
    else:
      continue
    full = os.path.join(root, path)
    with open(full, encoding="utf-8") as f:
      old = f.read()
    new = rewrite(old)
    if new == old:
      continue
    changed = sum(line.startswith("-") for line in difflib.unified_diff(
        old.splitlines(), new.splitlines(), n=0, lineterm="") if not line.startswith("---"))
    changes.append(f"{path}: {changed} line(s)")
    if not args.check:
      with open(full, "w", encoding="utf-8") as f:
        f.write(new)
  for line in changes:
    print(line)
  for line in warnings:
    print("warning:", line, file=sys.stderr)
  print(f"{len(changes)} change(s)" + (" (not written: --check)" if args.check else ""))
  return 1 if args.check and changes else 0


if __name__ == "__main__":
  sys.exit(main())
