"""Tests of robust_sparse.nn: masked layers, activations, pruning, ReLU masks."""
