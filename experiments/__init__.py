"""Pruning-and-reinitialisation experiments and the loop that runs them."""

from experiments.registry import EXPERIMENTS, REWIND_TARGETS

__all__ = ["EXPERIMENTS", "REWIND_TARGETS"]
