"""Foundations every other part of the toolkit stands on: pure Python, no TensorFlow.

The registry type, the spec syntax, crash-safe files, level claims, the quiet
start-up, the hyper-parameters (with the run-folder hash) and the seeds'
defaults. Reading a run's hyper-parameters never imports TensorFlow
(tests/test_layering.py checks it).

May import: the standard library, NumPy, absl; nothing else of the toolkit.
"""
