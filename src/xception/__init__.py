"""Xception (Chollet, CVPR 2017) in PyTorch.

The package, from the bottom up (each layer imports only the ones above it in this list):

    fileio, extras, preprocessing,  atomic writes and safe loads, optional extras, input transforms,
    runtime, plotting               device / amp / torchrun, every figure
    models/                         configs, layers, the two families, registry, feature maps
    weights/                        public sources, file readers, Keras conversion, matching, loading
    factory                         create_model: registry + weights + backbone view
    data/                           every source of images: digits, folders, shards, loose files
    deploy/                         the fast paths: folding, optimize, int8 and its CPU kernels, export
    inference/                      the user path: classify, predict, evaluate, explain, report, summary
    training/                       the loop, checkpoints, recipes, reports, fit
    segmentation/                   DeepLabv3+: model, TensorFlow DeepLab weights, train, mIoU, masks
    serve/                          the HTTP service: dynamic batching over worker processes
    bench/                          our fast paths against the peers (imported by the CLI only)
    demo, app, cli                  the main job, the web app and the command line
"""

from .factory import create_model
from .models import (AlignedXception, AlignedXceptionConfig, Block, FeatureExtractor, FeatureInfo, SeparableConv2d,
                     Xception, XceptionConfig, list_models, register_model, xception)
from .deploy import optimize
from .inference.classify import Classifier, Explanation, Prediction, decode_predictions
from .preprocessing import Preprocessing
from .segmentation import DeepLabConfig, DeepLabV3Plus
from .weights import load_pretrained, load_weights, save_safetensors
from .weights.imagenet import imagenet_classes

__all__ = [
    "AlignedXception",
    "AlignedXceptionConfig",
    "Block",
    "Classifier",
    "DeepLabConfig",
    "DeepLabV3Plus",
    "Explanation",
    "FeatureExtractor",
    "FeatureInfo",
    "Prediction",
    "Preprocessing",
    "SeparableConv2d",
    "Xception",
    "XceptionConfig",
    "create_model",
    "decode_predictions",
    "imagenet_classes",
    "list_models",
    "load_pretrained",
    "load_weights",
    "optimize",
    "register_model",
    "save_safetensors",
    "xception",
]
__version__ = "0.2.0"
