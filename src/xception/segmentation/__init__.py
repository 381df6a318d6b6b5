"""Semantic segmentation: DeepLabv3+ on the registry's backbones.

    model      DeepLabV3Plus, its config, ASPP and decoder; output stride changeable after loading
    weights    TensorFlow DeepLab checkpoints, our .safetensors, ImageNet encoders
    train      the paper's recipe on the classification engine (resume, SIGTERM, torchrun + SyncBN)
    evaluate   mIoU from one confusion matrix over the split, multi-scale + flip inference
    predict    palette masks and overlays for images on disk; ONNX export with dynamic size
"""

from .model import DeepLabConfig, DeepLabV3Plus
from .weights import load_deeplab, load_encoder, read_deeplab_checkpoint, save_deeplab

__all__ = ["DeepLabConfig", "DeepLabV3Plus", "load_deeplab", "load_encoder", "read_deeplab_checkpoint", "save_deeplab"]
