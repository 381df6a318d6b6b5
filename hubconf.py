"""torch.hub entry points: ``torch.hub.load(REPO_DIR, "xception", source="local", pretrained=...)``."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from xception import create_model as _create_model  # noqa: E402

dependencies = ["torch", "torchvision", "safetensors", "h5py"]


def xception(pretrained=None, **kwargs):
    """The seed's Xception. ``pretrained``: None, "keras", "timm" or a weights file path."""
    return _create_model("xception", pretrained=pretrained, **kwargs)


def _entry(name):
    def build(pretrained=None, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = name
    build.__doc__ = f"{name} (the modified aligned Xception). ``pretrained``: None or a weights file path."
    return build


xception41 = _entry("xception41")
xception41p = _entry("xception41p")
xception65 = _entry("xception65")
xception65p = _entry("xception65p")
xception71 = _entry("xception71")
