"""Runs the PyTorch / delve / torchattacks side of the fidelity checks, in the peers' process.

  python -m benchmarks.peers.fidelity_runner EXCHANGE_DIR

For every `EXCHANGE_DIR/<i>.json` ({"peer": "module:function"}) beside
`<i>.in.npz`, imports the function, calls it on the inputs (a dict of NumPy
arrays) and writes its outputs to `<i>.ref.npz`; an exception is written to
`<i>.error.txt` instead, so one failing reference does not hide the others.
Imports no TensorFlow.
"""

import glob
import importlib
import json
import os
import sys
import traceback

import numpy as np


def _default_dtype():
  torch = sys.modules.get("torch")
  return None if torch is None else torch.get_default_dtype()


def _restore_default_dtype(dtype):
  torch = sys.modules.get("torch")
  if torch is not None:
    torch.set_default_dtype(torch.float32 if dtype is None else dtype)


def main(exchange):
  for spec_path in sorted(glob.glob(os.path.join(exchange, "*.json"))):
    stem = spec_path[:-len(".json")]
    with open(spec_path) as f:
      spec = json.load(f)
    try:
      module_name, function_name = spec["peer"].split(":")
      function = getattr(importlib.import_module(module_name), function_name)
      with np.load(stem + ".in.npz") as data:
        inputs = {k: data[k] for k in data.files}
      dtype = _default_dtype()
      try:
        outputs = function(inputs)
      finally:
        _restore_default_dtype(dtype)  # No reference's global setting reaches the next.
      np.savez(stem + ".ref.npz", **{k: np.asarray(v) for k, v in outputs.items()})
    except Exception:  # noqa: BLE001 -- reported per check by the caller
      with open(stem + ".error.txt", "w") as f:
        f.write(traceback.format_exc())


if __name__ == "__main__":
  main(sys.argv[1])
