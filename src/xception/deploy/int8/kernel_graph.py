"""Static int8 on our CPU kernels: a converted quantized graph rewritten so that its depthwise convs
(the ReLU before each folded in) and, with 7-bit activations, its 1x1 convs (each residual add
folded in) run on :mod:`xception.deploy.kernels` instead of PyTorch's quantized ops."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .prepare import activation_qconfig
from .rounding import round_to_7bit


class Int8Depthwise(nn.Module):
    """A converted quantized depthwise conv run by our kernel (``torch.ops.xception.dw_conv_int8``,
    :mod:`xception.deploy.kernels`): same weights, bias and output quantization; ``relu_in`` applies the
    ReLU that fed it (removed from the graph) as the input is read."""

    def __init__(self, conv: nn.Module, *, relu_in: bool = False) -> None:
        super().__init__()
        import torch.ao.nn.intrinsic.quantized as nniq

        weight = conv.weight()  # (C, 1, KH, KW) qint8, per-channel scales
        q = weight.int_repr()
        self.register_buffer("packed", torch.ops.xception.dw_pack_int8(q))
        self.register_buffer("weight_sum", q.sum(dim=(1, 2, 3), dtype=torch.int32))
        scales = (weight.q_per_channel_scales() if weight.qscheme() in _PER_CHANNEL
                  else torch.full((q.shape[0],), weight.q_scale()))
        self.register_buffer("weight_scale", scales.float())
        bias = conv.bias()
        self.register_buffer("bias", bias.detach().float() if bias is not None else torch.zeros(q.shape[0]))
        self.kernel_size, self.stride = list(conv.kernel_size), list(conv.stride)
        self.padding, self.dilation = list(conv.padding), list(conv.dilation)
        self.scale, self.zero_point = float(conv.scale), int(conv.zero_point)
        self.relu_in, self.relu_out = relu_in, isinstance(conv, nniq.ConvReLU2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.xception.dw_conv_int8(
            x, self.packed, self.weight_sum, self.weight_scale, self.bias, self.kernel_size, self.stride,
            self.padding, self.dilation, self.scale, self.zero_point, self.relu_in, self.relu_out)

    def extra_repr(self) -> str:
        return (f"{self.weight_sum.numel()}, kernel_size={tuple(self.kernel_size)}, stride={tuple(self.stride)}, "
                f"relu_in={self.relu_in}, relu_out={self.relu_out}")


_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
# Where pw_pack_int8 puts a 16-column block's columns (kColOrder in deploy/kernels/int8.cpp).
_PW_COLUMN_ORDER = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])


class Int8Pointwise(nn.Module):
    """A converted quantized 1x1 conv (any stride) run by our GEMM kernel
    (``torch.ops.xception.pw_conv_int8``, :mod:`xception.deploy.kernels`): its weights rounded to 7 bits per
    output channel (``[-63, 63]``, what lets the kernel sum four products in int16; see
    ``deploy/kernels/int8.cpp``), the same bias and output quantization. For 7-bit activations only.
    ``rounded``: the 7-bit weights ``(q (N, K) int8, scale (N,))``, as :func:`calibrate_static`
    rounds them (:mod:`.rounding`); without it the conv's own 8-bit weights are rounded to nearest."""

    def __init__(self, conv: nn.Module, rounded: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        import torch.ao.nn.intrinsic.quantized as nniq

        shape = (conv.out_channels, conv.in_channels, 1, 1)
        if rounded is None:  # nearest rounding of the conv's 8-bit weights
            scale, q = round_to_7bit(conv.weight().dequantize().double().flatten(1))
        else:  # ``(q, scale)`` rounded from the fp32 weights at calibration (:func:`calibrate_static`)
            q, scale = rounded
            if not fits_7bit(conv, q, scale):
                raise ValueError(f"7-bit weights {tuple(q.shape)} {q.dtype} do not fit a 1x1 conv of shape {shape}")
        q = q.reshape(shape)
        self.register_buffer("packed", torch.ops.xception.pw_pack_int8(q))
        self.register_buffer("weight_sum", q.sum(dim=(1, 2, 3), dtype=torch.int32))
        self.register_buffer("weight_scale", scale.float())
        bias = conv.bias()
        self.register_buffer("bias", bias.detach().float() if bias is not None else torch.zeros(q.shape[0]))
        self.in_channels, self.out_channels, self.stride = conv.in_channels, conv.out_channels, list(conv.stride)
        self.scale, self.zero_point = float(conv.scale), int(conv.zero_point)
        self.relu_out = isinstance(conv, nniq.ConvReLU2d)

    def weight_int7(self) -> torch.Tensor:
        """The weights this conv multiplies by, as a per-channel qint8 tensor (values in [-63, 63])."""
        n, k = self.out_channels, self.in_channels
        packed = self.packed.view(-1, k // 4, 16, 4)  # (column blocks, K/4, 16, 4), columns in kernel order
        cols = torch.empty_like(packed)
        cols[:, :, _PW_COLUMN_ORDER] = packed
        w = cols.permute(0, 2, 1, 3).reshape(-1, k)[:n]
        return torch._make_per_channel_quantized_tensor(w.reshape(n, k, 1, 1), self.weight_scale.double(),
                                                        torch.zeros(n, dtype=torch.long), 0)

    # Set where a residual add was fused into this conv (:func:`with_cpu_kernels`): forward then
    # takes the other operand and returns ``other + conv`` quantized with this scale and zero point.
    add_scale: float | None = None
    add_zero_point: int | None = None

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        args = (x, self.packed, self.weight_sum, self.weight_scale, self.bias, self.out_channels, self.stride,
                self.scale, self.zero_point, self.relu_out)
        if other is None:
            return torch.ops.xception.pw_conv_int8(*args)
        if self.add_scale is None:
            raise ValueError("this 1x1 conv has no residual add fused into it")
        return torch.ops.xception.pw_conv_add_int8(*args, other, self.add_scale, self.add_zero_point)

    def extra_repr(self) -> str:
        add = "" if self.add_scale is None else f", add=(scale={self.add_scale:.4g}, zero_point={self.add_zero_point})"
        return f"{self.in_channels}, {self.out_channels}, stride={tuple(self.stride)}, relu_out={self.relu_out}{add}"


def fits_7bit(conv: nn.Module, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether ``(q, scale)`` are 7-bit weights for the 1x1 conv ``conv`` (float or converted)."""
    n, k = conv.out_channels, conv.in_channels
    return (tuple(q.shape) == (n, k) and q.dtype == torch.int8 and tuple(scale.shape) == (n,)
            and scale.is_floating_point() and bool(torch.isfinite(scale).all()) and int(q.abs().max()) <= 63)


def _is_pointwise_int8(m: nn.Module) -> bool:
    """A converted quantized 1x1 conv our GEMM kernel computes: groups 1, no padding, input
    channels a multiple of 8."""
    import torch.ao.nn.quantized as nnq

    return (isinstance(m, nnq.Conv2d) and tuple(m.kernel_size) == (1, 1) and m.groups == 1
            and tuple(m.padding) == (0, 0) and m.in_channels % 8 == 0 and m.weight().dtype == torch.qint8)


def _is_depthwise_int8(m: nn.Module) -> bool:
    """A converted quantized conv our depthwise kernel computes exactly: one filter per channel,
    zero padding, int8 weights with zero points 0."""
    import torch.ao.nn.quantized as nnq

    if not isinstance(m, nnq.Conv2d) or not (m.groups == m.in_channels == m.out_channels > 1):
        return False
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return False
    w = m.weight()
    if w.dtype != torch.qint8:
        return False
    zero_points = w.q_per_channel_zero_points() if w.qscheme() in _PER_CHANNEL else torch.tensor([w.q_zero_point()])
    return bool((zero_points == 0).all())


def _is_relu(node, modules: dict[str, nn.Module]) -> bool:
    import torch.nn.functional as F

    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (torch.relu, F.relu) and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu"


def with_cpu_kernels(quantized: nn.Module, *, pointwise: bool | None = None,
                     rounded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[nn.Module, int] | None:
    """A copy of a converted int8 graph with its depthwise convs run by our kernel, the ReLU feeding
    each of them folded in, and (``pointwise``; default: where activations are 7-bit, see
    :func:`activation_qconfig`) its 1x1 convs run by our GEMM with each residual add folded into
    the 1x1 conv that feeds it; ``(graph, convs replaced)``, or None where the kernels are
    unavailable (:func:`xception.deploy.kernels.load` says why). ``rounded``: 7-bit 1x1 weights by module
    name (:func:`rounded_pointwise`); a 1x1 conv without them is rounded to nearest. The input
    graph is left as it is."""
    import copy

    if not kernels.load():
        return None
    if pointwise is None:
        pointwise = activation_qconfig() == "x86"
    graph = copy.deepcopy(quantized)
    modules = dict(graph.named_modules())
    calls: dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    replaced = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        parent, _, attr = node.target.rpartition(".")
        if pointwise and _is_pointwise_int8(modules[node.target]):
            conv = Int8Pointwise(modules[node.target], (rounded or {}).get(node.target))
            setattr(graph.get_submodule(parent) if parent else graph, attr, conv)
            replaced += 1
            continue
        if not _is_depthwise_int8(modules[node.target]):
            continue
        source = node.args[0]
        relu_in = (hasattr(source, "op") and len(source.users) == 1 and _is_relu(source, modules)
                   and len(source.args) == 1 and (not getattr(modules.get(source.target), "inplace", False)
                                                  or len(source.args[0].users) == 1))
        if relu_in:  # the ReLU is applied as the kernel reads its input
            node.args = (source.args[0], *node.args[1:])
            graph.graph.erase_node(source)
        setattr(graph.get_submodule(parent) if parent else graph, attr, Int8Depthwise(modules[node.target], relu_in=relu_in))
        replaced += 1
    if pointwise:
        _fuse_residual_adds(graph)
    graph.graph.lint()
    graph.recompile()
    return graph, replaced


def _fuse_residual_adds(graph: nn.Module) -> None:
    """Folds each quantized add whose operand is the only use of an :class:`Int8Pointwise` output
    into that conv (Xception's 12 residual adds: the last 1x1 of a middle block, the skip conv of
    the others)."""
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.quantized.add, torch.ops.quantized.add.default):
            continue
        if len(node.args) != 4 or node.kwargs:
            continue
        for conv_arg, other in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if (getattr(conv_arg, "op", None) == "call_module" and len(conv_arg.users) == 1
                    and len(conv_arg.args) == 1 and not conv_arg.kwargs
                    and isinstance(graph.get_submodule(conv_arg.target), Int8Pointwise)
                    and graph.get_submodule(conv_arg.target).add_scale is None):
                break
        else:
            continue
        conv = graph.get_submodule(conv_arg.target)
        scale, zero_point = (_constant(graph, a) for a in node.args[2:])
        if scale is None or zero_point is None:
            continue
        conv.add_scale, conv.add_zero_point = float(scale), int(zero_point)
        with graph.graph.inserting_before(node):
            fused_node = graph.graph.call_module(conv_arg.target, (conv_arg.args[0], other))
        node.replace_all_uses_with(fused_node)
        graph.graph.erase_node(node)
        graph.graph.erase_node(conv_arg)


def _constant(graph: nn.Module, arg) -> float | None:
    """A number given to a graph node: itself, or the value of a get_attr node holding one."""
    if isinstance(arg, (int, float)):
        return arg
    if getattr(arg, "op", None) == "get_attr":
        value = getattr(graph, arg.target, None)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
        if isinstance(value, (int, float)):
            return value
    return None
