"""PyTorch's own batching of an epoch, for `benchmarks/fidelity/data_order.py` (no TensorFlow).

`batch_sampler(inputs)`: each epoch's permutation (the toolkit's shuffle, given)
as the sampler of `torch.utils.data.BatchSampler(drop_last=...)`, the
sampler a `DataLoader(shuffle=True, drop_last=...)` builds; its batches in order, the first
`steps` of them.
"""

import numpy as np
import torch.utils.data


def batch_sampler(inputs):
  size, steps = int(inputs["batch_size"]), int(inputs["steps"])
  drop_last = bool(inputs["drop_last"]) if "drop_last" in inputs else False
  batches = []
  for order in inputs["permutations"]:
    sampler = torch.utils.data.BatchSampler(order.tolist(), batch_size=size,
                                             drop_last=drop_last)
    loader = torch.utils.data.DataLoader(np.arange(len(order)), batch_sampler=sampler)
    batches += [batch.numpy() for batch in loader]  # Dataset[i] = i: the indices themselves.
  batches = batches[:steps]
  return {"rows": np.concatenate(batches), "sizes": np.array([len(b) for b in batches])}
