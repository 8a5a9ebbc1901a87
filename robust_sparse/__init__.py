"""The toolkit's core: hyper-parameters, layers, training engine, measurements, public API."""

# Imported as a library (a notebook, a Ray worker), TensorFlow's first import stays as quiet
# as the command line's (robust_sparse/startup.py); importing this package imports no TensorFlow.
from robust_sparse import startup as _startup

_startup.import_tensorflow_when_needed()
