"""Measurements of a network: saturation, activation sparsity, probes, receptive fields,
flatness, and the callbacks that feed them in the runner and in a user's `fit`.

The measurements the training step feeds (`--measure`) are one registry,
`registry.MEASUREMENTS`: each family declares its taps in its own module, and
`measurements.Measurements` composes the chosen ones.

May import: `robust_sparse.core`, `robust_sparse.nn`, `robust_sparse.custom_ops`.
"""
