"""The console scripts `robust-sparse-run` and `robust-sparse-analyze` (pyproject.toml).

Each runs its command's module as `python -m` does (the module's own
`if __name__ == "__main__":` block, flags from `sys.argv`), so the console
script, `python -m robust_sparse.run_experiments` and a checkout's
`python -m run_experiments` are one program.
"""

import runpy


def run_experiments():
  """`robust-sparse-run`: the runner, `python -m run_experiments`."""
  runpy.run_module("robust_sparse.run_experiments", run_name="__main__", alter_sys=True)


def run_analysis():
  """`robust-sparse-analyze`: the analysis, `python -m run_analysis`."""
  runpy.run_module("robust_sparse.run_analysis", run_name="__main__", alter_sys=True)
