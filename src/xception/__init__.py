"""Xception (Chollet, CVPR 2017) in PyTorch."""

from .aligned import AlignedXception, AlignedXceptionConfig
from .config import XceptionConfig
from .features import FeatureExtractor, FeatureInfo
from .model import Block, SeparableConv2d, Xception, xception
from .optimize import optimize
from .registry import create_model, list_models, register_model
from .weights import load_pretrained, load_weights, save_safetensors

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
    "load_pretrained",
    "load_weights",
    "optimize",
    "register_model",
    "save_safetensors",
    "xception",
]
__version__ = "0.1.0"
