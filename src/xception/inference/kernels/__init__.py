"""Fused inference kernels: Triton where it can run, pure PyTorch elsewhere.

:func:`separable_conv` and :func:`max_pool_add` take the same arguments as their references in
:mod:`.reference`. They use the Triton kernels for CUDA tensors (or for any tensor when
``TRITON_INTERPRET=1``, Triton's CPU interpreter, which is how the tests check them on a CPU)
and fall back to the PyTorch reference otherwise, e.g. when Triton is not installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from .reference import max_pool_add_reference, pool_output_size, separable_conv_reference

log = logging.getLogger(__name__)

HAS_TRITON = importlib.util.find_spec("triton") is not None
_tk = None  # the Triton module, imported on first use: Triton reads TRITON_INTERPRET at import


def _triton():
    global _tk, HAS_TRITON
    if _tk is None and HAS_TRITON:
        try:
            from . import triton_kernels
        except Exception as e:  # noqa: BLE001 - a broken Triton install: fall back, say why once
            HAS_TRITON = False
            log.warning("Triton kernels unavailable (%s); using the PyTorch reference", e)
        else:
            _tk = triton_kernels
    return _tk


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on tensors like ``t`` (CUDA, or the interpreter)."""
    if not HAS_TRITON or not (t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return False
    return _triton() is not None


def separable_conv(x: torch.Tensor, *args, use_triton: bool | None = None, **kwargs) -> torch.Tensor:
    """Fused depthwise + pointwise conv (+ bias, residual, ReLUs); see the reference for arguments."""
    if use_triton if use_triton is not None else triton_usable(x):
        return _triton().separable_conv(x, *args, **kwargs)
    return separable_conv_reference(x, *args, **kwargs)


def max_pool_add(x: torch.Tensor, *args, use_triton: bool | None = None, **kwargs) -> torch.Tensor:
    """Fused 3x3 max-pool + residual (or 1x1 skip conv) add; see the reference for arguments."""
    if use_triton if use_triton is not None else triton_usable(x):
        return _triton().max_pool_add(x, *args, **kwargs)
    return max_pool_add_reference(x, *args, **kwargs)


__all__ = [
    "HAS_TRITON",
    "max_pool_add",
    "max_pool_add_reference",
    "pool_output_size",
    "separable_conv",
    "separable_conv_reference",
    "triton_usable",
]
