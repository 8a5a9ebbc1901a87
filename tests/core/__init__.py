"""Tests of robust_sparse.core: hyper-parameters, the run folder, files, registries."""
