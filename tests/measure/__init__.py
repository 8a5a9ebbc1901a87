"""Tests of robust_sparse.measure: saturation, probes, receptive fields, flatness."""
