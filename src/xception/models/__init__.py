"""The networks: the seed's Xception and the aligned family, their configs, layers and registry.

    config      frozen configs on one base (ModelConfig)
    layers      the layers every model uses: input check, pooling, drop path, conv + BN, checkpointing
    base        XceptionBase: timm's model interface, written once; the families give their structure
    seed        the seed tutorial's Xception (module names of the seed, timm's legacy_xception)
    aligned     DeepLabv3+'s aligned Xception-41/65/71 and pre-activation 41p/65p (timm's names)
    features    feature taps and the features_only wrapper
    registry    name -> builder

Importing this package registers every model (``list_models()``).
"""

from .aligned import AlignedXception
from .base import XceptionBase
from .config import AlignedXceptionConfig, ModelConfig, XceptionConfig
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
    "XceptionBase",
    "XceptionConfig",
    "build_model",
    "feature_take_indices",
    "list_models",
    "register_model",
    "xception",
]
