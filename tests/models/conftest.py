"""Helpers shared by the model tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


def _randomise_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Random affine and running statistics, so eval-mode BN is not the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=generator) + 0.5
            m.bias.data = torch.randn(n, generator=generator) * 0.1
            m.running_mean = torch.randn(n, generator=generator) * 0.1
            m.running_var = torch.rand(n, generator=generator) * 1.5 + 0.5


@pytest.fixture(scope="session")
def randomise_bn() -> Callable[[nn.Module, torch.Generator], None]:
    """``randomise_bn(model, generator)``: random BN affine parameters and running statistics."""
    return _randomise_bn
