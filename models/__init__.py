"""Model registry: the lottery-ticket models, conv-bn, the ResNet, WideResNet and VGG zoo, ViTs.

`build_model(name, input_shape, num_classes, activation="relu", l1_reg=0.0,
normalize="none", dropout=0.0)` builds any of `MODELS.names()` or any
`wideresnet{depth}x{k}`; `NORMALIZATIONS` maps each `normalize` name to its
per-channel (mean, std) in [0, 1] pixels.

May import: `robust_sparse.core`, `robust_sparse.nn`, `robust_sparse.training`,
`robust_sparse.measure`, `robust_sparse.custom_ops`.
"""

import robust_sparse  # noqa: F401  First: a quiet TensorFlow start-up (robust_sparse/core/startup.py).

# Importing a model family's module registers its models in MODELS.
from robust_sparse.models import resnet  # noqa: F401
from robust_sparse.models import vgg  # noqa: F401
from robust_sparse.models import vit  # noqa: F401
from robust_sparse.models import wideresnet  # noqa: F401
from robust_sparse.models.registry import (AFTER_BN, AFTER_DENSE, AFTER_RESIDUAL, MODELS,
                                           NORMALIZATIONS, build_model, normalization_mean)

__all__ = ["AFTER_BN", "AFTER_DENSE", "AFTER_RESIDUAL", "MODELS", "NORMALIZATIONS",
           "build_model", "normalization_mean"]
