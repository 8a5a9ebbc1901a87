"""Tests of the experiments and the runner."""
