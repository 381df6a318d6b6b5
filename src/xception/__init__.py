"""Xception (Chollet, CVPR 2017) in PyTorch."""

from .aligned import AlignedXception, AlignedXceptionConfig
from .config import XceptionConfig
from .features import FeatureExtractor, FeatureInfo
from .model import Block, SeparableConv2d, Xception, xception
from .registry import create_model, list_models, register_model

__all__ = [
    "AlignedXception",
    "AlignedXceptionConfig",
    "FeatureExtractor",
    "FeatureInfo",
    "Block",
    "SeparableConv2d",
    "Xception",
    "XceptionConfig",
    "create_model",
    "list_models",
    "register_model",
    "xception",
]
__version__ = "0.1.0"
