"""Keras building blocks: masked layers, activations, sparsity modules, ReLU masks, pruning.

Layers are serializable and survive a `.keras` save and reload; their
registered names (`robust_sparse>MaskedDense`, ...) do not depend on this
folder, so files saved before the move still load.

May import: `robust_sparse.core`, `robust_sparse.custom_ops`, Keras, TensorFlow.
"""
