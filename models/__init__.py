"""Model registry: dense-300-100, LeNet-5 and the lottery-ticket Conv-2/4/6."""

from models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
