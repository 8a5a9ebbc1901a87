"""`python -m run_analysis`: robust_sparse/run_analysis.py, run from the repository root.

The body lives inside the `robust_sparse` package so that an installed copy
holds it too (the console script `robust-sparse-analyze`); this file keeps the
repository's command as it was.
"""
# A shim: the command's body is robust_sparse/run_analysis.py.

import runpy
import sys

if __name__ == "__main__":
  runpy.run_module("robust_sparse.run_analysis", run_name="__main__", alter_sys=True)
else:  # `import run_analysis` is the package's module itself, never a second copy of its flags.
  from robust_sparse import run_analysis as _module
  sys.modules[__name__] = _module
