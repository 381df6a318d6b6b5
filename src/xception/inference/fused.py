"""The seed :class:`~xception.models.Xception` run by the fused Triton kernels of :mod:`.kernels`."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import MaxPool2dSame
from ..models.seed import Block, SeparableConv2d, Xception
from . import kernels
from .folding import fold_batchnorms


class Unsupported(ValueError):
    """The model's structure is not one the fused path covers."""


@dataclass(frozen=True)
class _SepSpec:
    prefix: str
    stride: int
    padding: int
    dilation: int
    relu_in: bool
    mid: str
    has_dw_bias: bool


def _mid_name(act: nn.Module | None) -> str:
    if act is None:
        return "none"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.ELU) and act.alpha == 1.0:
        return "elu"
    raise Unsupported(f"activation {act!r} inside a separable conv")


class FusedXception(nn.Module):
    """The seed :class:`~xception.models.Xception` (BN folded) run by :mod:`.kernels`.

    Per block: each ReLU -> SeparableConv2d -> BN is one fused kernel (the ReLU applied on load,
    the BN as the pointwise bias); a strided block's max-pool, its 1x1 skip conv + BN and the
    residual add are a second kernel; a middle block's identity residual is added in the
    epilogue of its last separable conv. The stem's plain 3x3 convs (+ folded BN + ReLU) and
    the head (pool + linear) stay with PyTorch.
    """

    def __init__(self, model: Xception, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if not isinstance(model, Xception):
            raise Unsupported(f"the fused path covers the seed Xception, got {type(model).__name__}")
        folded = fold_batchnorms(model)
        self.dtype = dtype
        self.in_chans = folded.config.in_chans
        self.min_input_size = folded.min_input_size
        self.global_pool = folded.config.global_pool
        self.plan: list[tuple] = []
        for i, conv in enumerate((folded.conv1, folded.conv2)):
            if not isinstance(folded.get_submodule(f"bn{i + 1}"), nn.Identity):
                raise Unsupported("stem batch norm was not folded")
            self._buffer(f"stem{i}_w", conv.weight)
            self._buffer(f"stem{i}_b", conv.bias, torch.float32)
            self.plan.append(("stem", f"stem{i}", conv.stride, conv.padding, conv.dilation))
        for name in folded.block_names:
            self.plan.append(("block", self._block(name, getattr(folded, name))))
        for i, (conv, bn) in enumerate(((folded.conv3, folded.bn3), (folded.conv4, folded.bn4))):
            if not isinstance(bn, nn.Identity):
                raise Unsupported("exit batch norm was not folded")
            self.plan.append(("sep", self._sep(f"exit{i}", conv, relu_in=False), True))
        fc = folded.fc
        self.fc = copy.deepcopy(fc).float() if isinstance(fc, nn.Linear) else nn.Identity()

    def _buffer(self, name: str, t: torch.Tensor | None, dtype: torch.dtype | None = None) -> None:
        self.register_buffer(name, None if t is None else t.detach().to(dtype or self.dtype).contiguous())

    def _sep(self, prefix: str, sep: nn.Module, *, relu_in: bool) -> _SepSpec:
        if not isinstance(sep, SeparableConv2d):
            raise Unsupported(f"expected a SeparableConv2d, got {type(sep).__name__}")
        dw, pw = sep.conv1, sep.pointwise
        if dw.groups != dw.in_channels or dw.out_channels != dw.in_channels or dw.kernel_size[0] != dw.kernel_size[1]:
            raise Unsupported("depthwise conv is not a square per-channel conv")
        if len({dw.stride[0], dw.stride[1]}) > 1 or len({dw.padding[0], dw.padding[1]}) > 1 or \
                len({dw.dilation[0], dw.dilation[1]}) > 1 or not isinstance(dw.padding[0], int):
            raise Unsupported("depthwise conv with unequal stride/padding/dilation")
        if pw.kernel_size != (1, 1) or pw.stride != (1, 1) or pw.groups != 1:
            raise Unsupported("pointwise conv is not a plain 1x1")
        self._buffer(f"{prefix}_dw", dw.weight)
        self._buffer(f"{prefix}_dwb", dw.bias, torch.float32)
        self._buffer(f"{prefix}_pw", pw.weight[:, :, 0, 0].t())  # (C_in, C_out)
        self._buffer(f"{prefix}_b", pw.bias, torch.float32)
        return _SepSpec(prefix, dw.stride[0], dw.padding[0], dw.dilation[0], relu_in, _mid_name(sep.act),
                        dw.bias is not None)

    def _block(self, name: str, block: nn.Module) -> dict:
        if not isinstance(block, Block):
            raise Unsupported(f"{name} is a {type(block).__name__}, not a Block")
        seps: list[_SepSpec] = []
        pool = None
        relu = False
        for j, m in enumerate(block.rep):
            if isinstance(m, nn.ReLU):
                relu = True
            elif isinstance(m, SeparableConv2d):
                if pool is not None:
                    raise Unsupported(f"{name}: conv after the pool")
                seps.append(self._sep(f"{name}_{j}", m, relu_in=relu))
                relu = False
            elif isinstance(m, nn.Identity):
                continue  # a folded batch norm
            elif isinstance(m, nn.MaxPool2d) and not m.ceil_mode and m.kernel_size in (3, (3, 3)):
                stride = m.stride if isinstance(m.stride, int) else m.stride[0]
                dilation = m.dilation if isinstance(m.dilation, int) else m.dilation[0]
                padding = "same" if isinstance(m, MaxPool2dSame) else m.padding
                if not isinstance(padding, (int, str)):
                    raise Unsupported(f"{name}: pool padding {padding!r}")
                pool = (stride, dilation, padding)
            else:
                raise Unsupported(f"{name}: unsupported module {type(m).__name__} in rep")
        if relu or not seps:
            raise Unsupported(f"{name}: unexpected block layout")
        skip = None
        if block.residual and block.skip is not None:
            sk = block.skip
            if not isinstance(block.skipbn, nn.Identity) or sk.kernel_size != (1, 1) or sk.groups != 1:
                raise Unsupported(f"{name}: skip is not a folded 1x1 conv")
            self._buffer(f"{name}_skw", sk.weight[:, :, 0, 0].t())
            self._buffer(f"{name}_skb", sk.bias, torch.float32)
            skip = sk.stride[0]
        return {"name": name, "seps": seps, "pool": pool, "residual": block.residual, "skip": skip}

    def _run_sep(self, x: torch.Tensor, s: _SepSpec, *, relu_out: bool = False,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        g = lambda k: getattr(self, f"{s.prefix}_{k}")  # noqa: E731
        return kernels.separable_conv(
            x, g("dw"), g("pw"), g("b"), dw_bias=g("dwb") if s.has_dw_bias else None, stride=s.stride,
            padding=s.padding, dilation=s.dilation, relu_in=s.relu_in, mid_activation=s.mid,
            relu_out=relu_out, residual=residual)

    def _run_block(self, inp: torch.Tensor, spec: dict) -> torch.Tensor:
        name, seps, pool = spec["name"], spec["seps"], spec["pool"]
        h = inp
        for k, s in enumerate(seps):
            res = None
            if k == len(seps) - 1 and pool is None and spec["residual"]:
                res = inp if spec["skip"] is None else self._skip_conv(inp, name, spec["skip"])
            h = self._run_sep(h, s, residual=res)
        if pool is None:
            return h
        stride, dilation, padding = pool
        if not spec["residual"]:
            return kernels.max_pool_add(h, stride=stride, dilation=dilation, padding=padding)
        if spec["skip"] is None:
            return kernels.max_pool_add(h, inp, stride=stride, dilation=dilation, padding=padding)
        return kernels.max_pool_add(h, stride=stride, dilation=dilation, padding=padding, skip_input=inp,
                                    skip_weight=getattr(self, f"{name}_skw"),
                                    skip_bias=getattr(self, f"{name}_skb"), skip_stride=spec["skip"])

    def _skip_conv(self, x: torch.Tensor, name: str, stride: int) -> torch.Tensor:
        w = getattr(self, f"{name}_skw").t()[:, :, None, None]
        return F.conv2d(x, w.to(x.dtype), getattr(self, f"{name}_skb").to(x.dtype), stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans or min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"expected a (B, {self.in_chans}, H, W) input with H, W >= {self.min_input_size}, "
                             f"got shape {tuple(x.shape)}")
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        for step in self.plan:
            if step[0] == "stem":
                _, p, stride, padding, dilation = step
                x = F.relu(F.conv2d(x, getattr(self, f"{p}_w"), getattr(self, f"{p}_b").to(x.dtype),
                                    stride, padding, dilation))
            elif step[0] == "block":
                x = self._run_block(x, step[1])
            else:
                x = self._run_sep(x, step[1], relu_out=step[2])
        x = x.float()
        x = torch.amax(x, dim=(2, 3)) if self.global_pool == "max" else torch.mean(x, dim=(2, 3))
        return self.fc(x)  # (B, num_classes)
