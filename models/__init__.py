"""Model registry: dense-300-100, LeNet-5, the lottery-ticket Conv-2/4/6, conv-bn, ResNet-18."""

# Importing a model family's module registers its models in MODELS.
import models.resnet  # noqa: F401
from models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
