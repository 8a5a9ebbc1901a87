"""Measurements of a network: saturation, activation sparsity, probes, receptive fields,
flatness, and the callbacks that feed them in the runner and in a user's `fit`.

May import: `robust_sparse.core`, `robust_sparse.nn`, `robust_sparse.custom_ops`.
"""
