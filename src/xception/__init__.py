"""Xception (Chollet, CVPR 2017) in PyTorch."""

from .config import XceptionConfig
from .model import Block, SeparableConv2d, Xception, xception
from .optimize import optimize
from .registry import create_model, list_models, register_model

__all__ = [
    "Block",
    "SeparableConv2d",
    "Xception",
    "XceptionConfig",
    "create_model",
    "list_models",
    "optimize",
    "register_model",
    "xception",
]
__version__ = "0.1.0"
