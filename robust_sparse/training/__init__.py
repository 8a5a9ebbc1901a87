"""The training machinery: the step library, the compiled loop, the Keras front-end.

Steps composed from small functions over tensors (steps.py), the engine that
runs k of them per compiled call (engine.py), its XLA choice (compilation.py),
`RobustModel` (keras_model.py), optimizers, schedules, `tf.distribute`
(distribute.py), shared arrays, the lottery-ticket callback, TensorBoard
files, and `sharpness/` (SAM, ASAM, SSAM).

May import: `robust_sparse.core`, `robust_sparse.nn`, `robust_sparse.measure`,
`robust_sparse.custom_ops`.
"""
