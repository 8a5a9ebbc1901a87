"""Tests of robust_sparse.training: steps, the engine, optimizers, schedules, sharpness."""
