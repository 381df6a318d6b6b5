"""Optional features and the extra that installs each: a missing one is a one-line error.

``pip install "xception[onnx]"`` (export), ``"xception[bench]"`` (the benchmark peers),
``"xception[tensorboard]"`` (TensorBoard logs), ``"xception[app]"`` (the web app), ``"xception[summary]"``
(the layer table), ``"xception[shards]"`` (WebDataset shards); ``"xception[test]"`` installs all of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

class MissingExtra(ImportError):
    """An optional feature was used without its extra; the message names the install command."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtra` naming ``pip install "xception[extra]"``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{feature} needs {module.split('.')[0]}: pip install \"xception[{extra}]\"") from None
