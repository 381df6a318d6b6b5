"""The model interface of both families, written once: timm's, as its users know it.

:class:`XceptionBase` holds the config, the classifier, gradient checkpointing, the forwards
(``forward_features``, ``forward_head``, ``forward``, ``forward_intermediates``) and the
initialisation. A family subclass provides only its structure:

    stem(x)             (B, in_chans, H, W) -> (B, 64, ~H/2, ~W/2): a method or an ``nn.Sequential``
    blocks              the blocks in order, an iterable of modules (a tuple or an ``nn.Sequential``);
                        each has ``forward_with_tap(x) -> (output, tap)``, ``tap`` being the map of
                        the feature tap inside it (if ``feature_info`` has one there)
    exit_tail(x)        what runs after the blocks (the seed's exit-flow convs; by default nothing)
    classify(x)         the classifier on pooled features, and ``classifier_name`` its module path
    feature_info, feature_taps   the taps (``forward_intermediates``)
    num_features, min_input_size, final_relu

The forwards script (``torch.jit.script``), trace (``torch.fx``, torchvision's
``create_feature_extractor``), export (``torch.export``) and compile (``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .features import feature_take_indices
from .layers import check_images, checkpoint_module, global_pool

torch.fx.wrap("check_images")  # FX records the input check as one call: its branches read shapes

STEM = -1  # a feature tap on the stem's output (``feature_taps``)


class XceptionBase(nn.Module):
    """The shared model interface. Build a subclass from its config (or the config's fields as kwargs).

    Attributes:
        config: the frozen config the model was built from (``reset_classifier`` replaces it).
        num_classes, num_features: classifier outputs (0: no classifier) and its input channels.
        feature_info: one dict per feature tap: ``num_chs``, ``reduction``, ``module`` (a node
            name torchvision's ``create_feature_extractor`` returns that tap for).
        feature_taps: where each tap is taken: ``STEM`` (-1), a block index (the tap inside that
            block), or ``len(blocks)`` (the output of ``exit_tail``, before the final ReLU).
    """

    config_class: type[ModelConfig] = ModelConfig
    classifier_name = "fc"
    # Python-only attributes (the loaders add model_name, class_names, preprocessing) that
    # TorchScript must not try to type.
    __jit_ignored_attributes__ = ["config", "feature_info", "model_name", "class_names", "preprocessing"]

    def __init__(self, config: ModelConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} is built from a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config
        # Plain copies of the config values the forwards read (TorchScript cannot read a dataclass).
        self.num_classes = config.num_classes
        self.in_chans = config.in_chans
        self.global_pool = config.global_pool
        self.drop_rate = float(config.drop_rate)
        self.num_features = 2048
        self.min_input_size = 1
        self.final_relu = False
        self.grad_checkpointing = False
        self.feature_info: list[dict[str, Any]] = []
        self.feature_taps: list[int] = []

    def _init_weights(self) -> None:
        """He-normal over k*k*out_channels for every conv (the seed's; timm's fan-out He init), BN = identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- the structure a family provides ---------------------------------------------------------

    def exit_tail(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- classifier and checkpointing ------------------------------------------------------------

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_name)

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` (0 removes it)."""
        changes: dict[str, Any] = {"num_classes": num_classes}
        if global_pool is not None:
            changes["global_pool"] = global_pool
        self.config = dataclasses.replace(self.config, **changes)  # validates
        self.num_classes = num_classes
        self.global_pool = self.config.global_pool
        like = next(self.parameters())
        fc = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
              if num_classes > 0 else nn.Identity())
        self.set_submodule(self.classifier_name, fc)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def run_block(self, block: nn.Module, x: torch.Tensor, with_tap: bool = False) -> Any:
        """``block(x)``, or ``(output, tap)`` if ``with_tap``; recomputed in backward if checkpointing."""
        fn = block.forward_with_tap if with_tap else block
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_module(block, x, fn=fn)
        return fn(x)

    # -- forwards --------------------------------------------------------------------------------

    def _final_act(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-activation blocks end in a conv: one more ReLU (not in place, the map is a feature tap).
        return F.relu(x) if self.final_relu else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, after the final ReLU: (B, num_features, ~H/os, ~W/os)."""
        x = check_images(x, self.in_chans, self.min_input_size)  # (B, in_chans, H, W)
        x = self.stem(x)  # (B, 64, ~H/2, ~W/2)
        for block in self.blocks:  # 728 channels at H/16 through the middle flow
            if torch.jit.is_scripting():
                x = block(x)
            else:
                x = self.run_block(block, x)
        return self._final_act(self.exit_tail(x))  # (B, num_features, H/os, W/os)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling, dropout and the classifier; ``pre_logits`` stops before the classifier."""
        x = global_pool(x, self.global_pool)  # (B, num_features)
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.classify(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns the feature maps of ``feature_info`` (timm's interface).

        Args:
            x: (B, in_chans, H, W) images.
            indices: taps to return: ``None`` all, an int ``n`` the last ``n``, or a sequence of
                tap indices (negative ones count from the end).
            norm: accepted for timm compatibility; these models have no final norm to apply.
            stop_early: skip what follows the block holding the deepest requested tap.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of maps.

        Returns:
            ``(features, maps)``, or ``maps`` if ``intermediates_only``. ``features`` is what
            ``forward_features`` returns, or with ``stop_early`` the output of the last block run
            (the stem's, for the stem tap alone). ``maps`` are (B, num_chs, ~H / reduction,
            ~W / reduction) tensors in tap order.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        x = check_images(x, self.in_chans, self.min_input_size)
        blocks = list(self.blocks)
        wanted = {self.feature_taps[i] for i in take}
        end = self.feature_taps[max_index] if stop_early else len(blocks)
        maps = []
        x = self.stem(x)  # (B, 64, ~H/2, ~W/2)
        if STEM in wanted:
            maps.append(x)
        for i, block in enumerate(blocks[:end + 1]):
            if i in wanted:
                x, tap = self.run_block(block, x, with_tap=True)
                maps.append(tap)
            else:
                x = self.run_block(block, x)
        if end == len(blocks):
            x = self.exit_tail(x)  # (B, num_features, H/os, W/os)
            if end in wanted:
                maps.append(x)
            x = self._final_act(x)
        return maps if intermediates_only else (x, maps)
