"""robust-sparse: sparse, adversarially robust networks in TensorFlow 2 / Keras 3.

The toolkit's one namespace: its packages are `robust_sparse.attacks`,
`robust_sparse.data`, `robust_sparse.models`, `robust_sparse.experiments`,
`robust_sparse.analysis` and `robust_sparse.custom_ops`, beside this package's
own modules, so that a user's `data/`, `models.py` or `experiments/` never
shadows them nor is shadowed by them.

An installed copy holds them as sub-folders (pyproject.toml maps each
repository folder there). In a source checkout they stay the repository's
top-level folders (attacks/, data/, ... beside robust_sparse/), so this
package's path also searches the repository root. Nothing imports them by
their top-level names (`tools/namespace_imports.py` rewrote the tree), so no
module, and no registry, is ever loaded twice under two names.
"""

import os as _os

_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CHECKOUT = _os.path.dirname(_HERE)
# A checkout: the packages are beside this folder, not inside it (an installed copy).
if (not _os.path.isdir(_os.path.join(_HERE, "attacks"))
    and _os.path.isfile(_os.path.join(_CHECKOUT, "run_experiments.py"))
    and _os.path.isfile(_os.path.join(_CHECKOUT, "attacks", "__init__.py"))):
  __path__.append(_CHECKOUT)  # pylint: disable=used-before-assignment

# Imported as a library (a notebook, a Ray worker), TensorFlow's first import stays as quiet
# as the command line's (robust_sparse/core/startup.py); importing this package imports no TensorFlow.
from robust_sparse.core import startup as _startup  # noqa: E402  After the path: it may be needed.

_startup.import_tensorflow_when_needed()
