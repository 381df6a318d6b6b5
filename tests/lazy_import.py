"""Heavy reference libraries (TensorFlow: ~9 s to import) imported when a test first uses them, not
when pytest collects the module: every xdist worker collects every module, one runs the tests."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import pytest


class LazyModule(ModuleType):
    """Stands for module ``name``; the first read of a public attribute imports it. Private names
    are not forwarded: pytest probes every module global for its own markers while collecting."""

    def __init__(self, name: str) -> None:
        super().__init__(name)

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(importlib.import_module(self.__name__), attr)


def skip_without(name: str) -> pytest.MarkDecorator:
    """Skip (a module's tests, as ``pytestmark``) where ``name`` is not installed, without importing it."""
    return pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"needs {name}")
