"""The networks: the seed's Xception and the aligned family, their configs, layers and registry.

Importing this package registers every model (``list_models()``).
"""

from .aligned import AlignedXception, AlignedXceptionConfig
from .config import ModelConfig, XceptionConfig
from .features import FeatureExtractor, FeatureInfo, feature_take_indices
from .registry import build_model, list_models, register_model
from .seed import Block, SeparableConv2d, Xception, xception

__all__ = [
    "AlignedXception",
    "AlignedXceptionConfig",
    "Block",
    "FeatureExtractor",
    "FeatureInfo",
    "ModelConfig",
    "SeparableConv2d",
    "Xception",
    "XceptionConfig",
    "build_model",
    "feature_take_indices",
    "list_models",
    "register_model",
    "xception",
]
