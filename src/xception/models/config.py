"""Frozen configuration dataclasses for the model variants.

A config is created once, validated, and never mutated: derive a new one with
:func:`dataclasses.replace`. ``dataclasses.asdict(config)`` round-trips through
``create_model(name, **asdict(config))``, which is how checkpoints and
``.safetensors`` files record the model they hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

ACTIVATIONS = ("none", "relu", "elu")
GLOBAL_POOLS = ("avg", "max")
POOL_PADDINGS = ("torch", "same")
DEPTHS = (41, 65, 71)  # of the aligned family

C = TypeVar("C", bound="ModelConfig")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The options every model has, their checks, and the dict round-trip.

    Args:
        num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
        in_chans: input image channels.
        drop_rate: dropout probability before the classifier (the paper uses 0.5 on ImageNet).
        global_pool: ``"avg"`` or ``"max"`` pooling of the last feature map.
        output_stride: ratio of input to final feature-map size (32, 16 or 8). Strides beyond it
            become dilation in the following layers; the weights are the same at every value.
        drop_path_rate: stochastic depth: probability of dropping a residual branch, rising
            linearly over the blocks to this value.
        bn_eps: batch-norm epsilon.
    """

    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    global_pool: str = "avg"
    output_stride: int = 32
    drop_path_rate: float = 0.0
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise ValueError(f"in_chans must be an integer >= 1, got {self.in_chans!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if not self.bn_eps > 0:
            raise ValueError(f"bn_eps must be > 0, got {self.bn_eps!r}")
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride!r}")
        _check_choice("global_pool", self.global_pool, GLOBAL_POOLS)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """Build from a dict (e.g. checkpoint metadata), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class XceptionConfig(ModelConfig):
    """The seed's Xception, with the options of timm/Keras users and the paper's ablations.

    The options of :class:`ModelConfig` (``num_classes``, ``in_chans``, ``drop_rate``,
    ``global_pool``, ``output_stride``, ``drop_path_rate``; ``bn_eps`` 1e-5 as PyTorch, 1e-3 as
    Keras), and:

    Args:
        middle_blocks: number of middle-flow blocks (8 in the paper).
        intermediate_activation: nonlinearity between depthwise and pointwise conv
            (``"none"`` as in the paper, ``"relu"``, ``"elu"``; the paper's Figure 10).
        residual: keep the residual connections (the paper's Figure 9 ablates them).
        pool_padding: ``"torch"`` = the seed's ``MaxPool2d(3, 2, padding=1)``; ``"same"`` =
            TensorFlow/Keras asymmetric padding, exact at every input size.
    """

    middle_blocks: int = 8
    intermediate_activation: str = "none"
    residual: bool = True
    pool_padding: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.middle_blocks, int) or self.middle_blocks < 0:
            raise ValueError(f"middle_blocks must be an integer >= 0, got {self.middle_blocks!r}")
        _check_choice("intermediate_activation", self.intermediate_activation, ACTIVATIONS)
        _check_choice("pool_padding", self.pool_padding, POOL_PADDINGS)


@dataclass(frozen=True)
class AlignedXceptionConfig(ModelConfig):
    """A modified aligned Xception (DeepLabv3+, timm's ``xception41`` ... ``xception71``).

    The options of :class:`ModelConfig` (``bn_eps`` defaults to 1e-3, as the TensorFlow-trained
    weights; 1e-5 for ``xception41p``), and:

    Args:
        depth: 41, 65 or 71 (41: 8 middle blocks; 65: 16; 71: 16 and two more entry blocks).
        preact: pre-activation blocks (BN + ReLU before each separable conv; timm's ``41p``/``65p``).
    """

    depth: int = 65
    preact: bool = False
    bn_eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be one of {DEPTHS}, got {self.depth!r}")
        if not isinstance(self.preact, bool):
            raise ValueError(f"preact must be True or False, got {self.preact!r}")
        super().__post_init__()
