"""Analyses of finished runs: loading them (load.py), figures, tables and the report.

Reading runs, hashes and hyper-parameters imports no TensorFlow (tests/test_layering.py);
the analyses that rebuild networks (masking checks, receptive fields) import it when run.

May import: everything below it; never the entry points.
"""
