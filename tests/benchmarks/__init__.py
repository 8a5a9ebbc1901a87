"""Tests of the benchmarks and the fidelity checks."""
