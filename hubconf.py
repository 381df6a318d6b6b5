"""torch.hub entry points: ``torch.hub.load(REPO_DIR, "xception", source="local", pretrained=...)``."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from xception.registry import create_model as _create_model  # noqa: E402

dependencies = ["torch", "torchvision", "safetensors", "h5py"]


def xception(pretrained=None, **kwargs):
    """The seed's Xception. ``pretrained``: None, "keras", "timm" or a weights file path."""
    return _create_model("xception", pretrained=pretrained, **kwargs)
