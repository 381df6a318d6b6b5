"""Int8 on the CPU, in two forms.

**Dynamic** (no calibration data; fast where the CPU has int8 dot products, VNNI / AMX).
Xception's 1x1 convolutions hold about 7.8 of its 8.4 GMACs. On a CPU with AVX-512 VNNI an
int8 x int8 -> int32 matrix product runs about twice as fast as the same product in bf16 (the
project's earlier 2-core EPYC: ~410 vs ~200 GMAC/s at the middle flow's 361x728x728), so
:func:`quantize_pointwise` swaps those convs for :class:`Int8PointwiseConv`:

* weights: symmetric int8 per output channel (scale = max |w| / 127), computed once;
* activations: symmetric int8 per pixel, scales computed on every call (dynamic quantization:
  no calibration data, and nothing depends on inputs seen before);
* ``y = int_mm(q_x, q_w) * s_pixel * s_channel + bias``, returned in the input's dtype.

Everything else (stem, depthwise convs, pools, head) stays in the model's floating dtype. Under
``torch.compile`` the per-pixel quantization and the rescale fuse with the neighbouring ReLU,
residual add and dtype casts. Convs with few input channels stay in floating point: their
products are cheap and the int32 output would cost more memory traffic than the int8 saves.

**Static** (:func:`calibrate_static`, :class:`StaticInt8`): every conv in int8 with activation
ranges calibrated on images (FX graph-mode quantization), activations int8 between layers. Its
depthwise and 1x1 convs run on our own AVX2 kernels where they build (:func:`with_cpu_kernels`,
:mod:`.kernels.cpu`), the rest on PyTorch's quantized kernels (oneDNN).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .kernels import cpu as cpu_kernels
from .kernels.cpu import cpu_flags
from .rounding import InputMoments, gptq_round, round_to_7bit

log = logging.getLogger(__name__)

# Below this many input channels a 1x1 conv stays in floating point (measured on the 2-core
# EPYC, bf16 rest, compiled: threshold 0 -> 23.0, 128 -> 23.8, 256 -> 23.6, none -> 19.9 img/s).
MIN_IN_CHANNELS = 128


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a 2-D tensor: ``(q, scale)`` with ``x ~= q * scale``."""
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)  # (M, 1)
    q = torch.round(x * (127.0 / amax)).to(torch.int8)
    return q, amax * (1.0 / 127.0)


class Int8PointwiseConv(nn.Module):
    """A 1x1 convolution (any stride, groups 1, no padding) with int8 weights and activations."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not is_pointwise(conv):
            raise ValueError(f"Int8PointwiseConv takes a 1x1 conv with groups 1 and no padding, got {conv}")
        w = conv.weight.detach().double().flatten(1)  # (O, C)
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (O,)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride = conv.stride
        # (C, O) int8: the right operand of the (pixels, C) x (C, O) product
        self.register_buffer("weight_q", torch.round(w / scale[:, None]).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale.float())
        bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias)

    def _apply(self, fn, recurse=True):
        # A model-wide cast (model.to(torch.bfloat16)) moves the scales and bias but keeps them
        # fp32: rounding them to bf16 would add a per-channel error on top of the int8 one.
        kept = {k: self._buffers[k] for k in ("weight_scale", "bias")}
        super()._apply(fn, recurse)
        for k, v in kept.items():
            self._buffers[k] = v.to(self._buffers[k].device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        sh, sw = self.stride
        if sh > 1 or sw > 1:
            x = x[:, :, ::sh, ::sw]
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c).float()  # (B*H*W, C); a view if channels-last
        q, row_scale = quantize_per_row(rows)
        acc = torch._int_mm(q, self.weight_q)  # (B*H*W, O) int32
        y = acc.float() * row_scale * self.weight_scale + self.bias
        return y.to(x.dtype).view(b, h, w, self.out_channels).permute(0, 3, 1, 2)  # (B, O, H, W) channels-last

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def is_pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1
            and conv.padding in ((0, 0), "valid") and conv.padding_mode == "zeros")


@torch.no_grad()
def quantize_pointwise(model: nn.Module, *, min_in_channels: int = MIN_IN_CHANNELS) -> int:
    """Replace (in place) every 1x1 conv with at least ``min_in_channels`` inputs by an
    :class:`Int8PointwiseConv`; returns how many were replaced. Fold batch norms first
    (:func:`~xception.inference.folding.fold_batchnorms`) so the folded scale is quantized with the weight.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if name and is_pointwise(m) and m.in_channels >= min_in_channels]
    for name, conv in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8PointwiseConv(conv))
    return len(targets)


# ---------------------------------------------------------------------------------------------
# Static int8: every conv (stem, depthwise, pointwise, skip) with calibrated activation ranges


# PyTorch's quantized-kernel backend for the static path: the weights are packed for it when the
# model is converted. Packed for oneDNN the calibrated network ran fastest on the project's AVX2
# machine (299 px, batch 1, 2 threads, same process: 73-91 ms per image against 94-101 packed for
# "x86" and 88-106 for fbgemm), and oneDNN is the backend with VNNI / AMX kernels on newer CPUs.
STATIC_ENGINE = "onednn"
_OBSERVER_KEY = "activation_post_process_"


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether bf16 arithmetic is native here (AVX-512 BF16 or AMX). Without it oneDNN emulates
    bf16: a 361x728x728 bf16 product ran at 1 GMAC/s on an AVX2 CPU against 76 in fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot(flags: set[str] | None = None) -> bool:
    """Whether the CPU has int8 dot-product instructions (VNNI or AMX), which the dynamic path's
    ``torch._int_mm`` needs to be fast (1.4 GMAC/s on an AVX2 CPU without them)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


@contextlib.contextmanager
def quantized_engine(name: str):
    """PyTorch's quantized-kernel backend set to ``name`` for a while."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class _Features(nn.Module):
    """``model.forward_features`` as a module: the part the static path quantizes. The global pool
    and the classifier stay in fp32 (~0.03% of the work; the quantized mean also fails on the 1x1
    channels-last map that 32 px inputs end with)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def prepare_static(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model``'s feature extractor (eval mode, CPU, fp32) with conv + BN (+ ReLU) fused
    and an observer on every activation, ready for calibration batches (or recorded states)."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    features = _Features(copy.deepcopy(model).eval().cpu().float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the FX quantization API's deprecation notices
        return prepare_fx(features, get_default_qconfig_mapping(activation_qconfig()),
                          example_inputs=(example.cpu().float(),))


def activation_qconfig() -> str:
    """Which default qconfig the activations get: ``"onednn"`` (full 8-bit range) on CPUs with
    int8 dot-product instructions, else ``"x86"`` (7-bit: without VNNI the u8 x s8 pair products
    are summed in saturating int16, and full-range activations overflow it: on the AVX2 machine
    the demo's digits model fell from 99.44% to 97.2% top-1, logits 28% off, against 99.44% and
    2.6% off with 7-bit activations). Decided when the model is converted, so a calibration
    written on one machine runs right on another: the observers' histograms are what is stored."""
    return "onednn" if cpu_has_int8_dot() else "x86"


def observer_state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """The activation observers' state (ranges and histograms) of a calibrated prepared model."""
    return {k: v.detach().clone() for k, v in prepared.state_dict().items() if k.startswith(_OBSERVER_KEY)}


class Int8Depthwise(nn.Module):
    """A converted quantized depthwise conv run by our kernel (``torch.ops.xception.dw_conv_int8``,
    :mod:`.kernels.cpu`): same weights, bias and output quantization; ``relu_in`` applies the
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
# Where pw_pack_int8 puts a 16-column block's columns (kColOrder in kernels/cpu/int8.cpp).
_PW_COLUMN_ORDER = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])


class Int8Pointwise(nn.Module):
    """A converted quantized 1x1 conv (any stride) run by our GEMM kernel
    (``torch.ops.xception.pw_conv_int8``, :mod:`.kernels.cpu`): its weights rounded to 7 bits per
    output channel (``[-63, 63]``, what lets the kernel sum four products in int16; see
    ``kernels/cpu/int8.cpp``), the same bias and output quantization. For 7-bit activations only.
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
            if not _fits_7bit(conv, q, scale):
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


def _fits_7bit(conv: nn.Module, q: torch.Tensor, scale: torch.Tensor) -> bool:
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
    unavailable (:func:`.kernels.cpu.load` says why). ``rounded``: 7-bit 1x1 weights by module
    name (:func:`rounded_pointwise`); a 1x1 conv without them is rounded to nearest. The input
    graph is left as it is."""
    import copy

    if not cpu_kernels.load():
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


class StaticInt8(nn.Module):
    """A model run by PyTorch's quantized CPU kernels: int8 weights (per output channel) and int8
    activations (per tensor, ranges from calibration) through every conv, batch norms fused,
    ReLUs and residual adds on int8 tensors; the global pool and the classifier in fp32.

    ``float_model`` is the fp32 model it was made from (Grad-CAM and export use it). The quantized
    graph is kept out of the module tree, so ``.to()`` never touches its packed weights; it runs on
    the CPU only. Where our CPU kernels can run (:mod:`.kernels.cpu`), the depthwise and (with
    7-bit activations) 1x1 convs run on them; ``kernels = False`` keeps PyTorch's quantized ops
    for all, which is what an exported file holds (it then loads without this package).
    """

    def __init__(self, float_model: nn.Module, state: dict[str, torch.Tensor], info: dict) -> None:
        super().__init__()
        import warnings

        from torch.ao.quantization.quantize_fx import convert_fx

        self.float_model = float_model
        self.info = dict(info)
        example = torch.zeros(1, getattr(getattr(float_model, "config", None), "in_chans", 3), 32, 32)
        prepared = prepare_static(float_model, example)
        missing = sorted(set(observer_state(prepared)) - set(state))
        if missing:
            raise ValueError(f"int8 calibration state does not match the model: {len(missing)} observers "
                             f"missing, e.g. {missing[:2]}")
        prepared.load_state_dict(state, strict=False)
        self._rounded = _rounded_from_state(state)
        convs = _pointwise_convs(prepared)
        for name, (q, scale) in self._rounded.items():
            if name not in convs or not _fits_7bit(convs[name], q, scale):
                raise ValueError(f"int8 calibration state has 7-bit weights {tuple(q.shape)} {q.dtype} for "
                                 f"{name}, which do not fit a 1x1 conv of this model")
        with warnings.catch_warnings(), quantized_engine(STATIC_ENGINE):
            # the engine active here picks the kernels: weights are packed for it once, now
            warnings.simplefilter("ignore")
            object.__setattr__(self, "_quantized", convert_fx(prepared))
        for name in ("class_names", "preprocessing", "num_classes", "config", "model_name"):
            if hasattr(float_model, name):
                object.__setattr__(self, name, getattr(float_model, name))

    # Run the depthwise and 1x1 convs on our kernels where they can run (see the class docstring).
    kernels = True

    def graph(self) -> nn.Module:
        """The quantized feature graph this model runs: with our kernels where they are in use."""
        if not self.kernels:
            return self._quantized
        if "_fast" not in self.__dict__:
            built = with_cpu_kernels(self._quantized, rounded=self._rounded)
            self.__dict__["_fast"] = built[0] if built else None
            if built:
                log.debug("%d convs on our int8 kernels", built[1])
        return self.__dict__["_fast"] or self._quantized

    @property
    def uses_cpu_kernels(self) -> bool:
        return self.graph() is not self._quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"the int8 model runs on the CPU, got an input on {x.device}")
        x = x.float().contiguous()
        with torch.no_grad(), quantized_engine(STATIC_ENGINE):
            frozen = self._frozen(x) if self.frozen else None
            return frozen(x) if frozen is not None else self.float_model.forward_head(self.graph()(x))

    # Run through a traced, frozen TorchScript graph per input shape (the same ops without the
    # Python interpreter between them: 80 ms against 91 ms per 299 px image on the AVX2 machine,
    # identical outputs). A few shapes are kept; tracing takes ~1 s. ``frozen = False`` turns it off.
    frozen = True
    MAX_FROZEN_SHAPES = 4

    def _frozen(self, x: torch.Tensor):
        import warnings

        cache = self.__dict__.setdefault("_frozen_graphs", {})
        key = (tuple(x.shape), self.kernels)
        if key not in cache:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notices
                    graph = torch.jit.freeze(torch.jit.trace(self.traceable(), x, check_trace=False).eval())
            except Exception as e:  # noqa: BLE001 - the FX graph computes the same function
                log.warning("int8 model runs without TorchScript (%s: %s)", type(e).__name__, e)
                self.frozen = False
                return None
            if len(cache) >= self.MAX_FROZEN_SHAPES:
                cache.pop(next(iter(cache)))
            cache[key] = graph
        return cache[key]

    def extra_repr(self) -> str:
        return (f"engine={STATIC_ENGINE!r}, activations={'8' if activation_qconfig() == 'onednn' else '7'}-bit, "
                f"calibration={self.info.get('images')} images, conv kernels="
                f"{'ours' if self.__dict__.get('_fast') is not None else STATIC_ENGINE}")  # no build here

    def traceable(self) -> nn.Module:
        """The same function as a plain module (quantized features, fp32 head) for ``torch.jit.trace``:
        the graph :meth:`graph` runs (PyTorch's ops only with ``kernels = False``)."""
        return _Traceable(self.graph(), self.float_model)


class _Traceable(nn.Module):
    def __init__(self, features: nn.Module, float_model: nn.Module) -> None:
        super().__init__()
        self.features, self.head = features, float_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.forward_head(self.features(x))


@torch.no_grad()
def calibrate_static(model: nn.Module, batches, *, info: dict | None = None, progress: bool = False) -> StaticInt8:
    """Quantize ``model`` statically: run ``batches`` (an iterable of (B, C, H, W) float tensors,
    preprocessed like the model's inputs) through its observers, then convert.

    The returned :class:`StaticInt8` records in ``info`` how it was made (image count, engine,
    torch version, plus what ``info`` adds); :func:`observer_state` of the calibration is in
    ``state``, which is all that is needed to rebuild it from the fp32 weights.
    """
    from tqdm import tqdm

    prepared = moments = None
    images = 0
    for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
        batch = batch.cpu().float()
        if prepared is None:
            prepared = prepare_static(model, batch[:1])
            moments = InputMoments(_pointwise_convs(prepared))
        prepared(batch)
        images += batch.shape[0]
    if prepared is None:
        raise ValueError("int8 calibration needs at least one batch of images")
    moments.close()
    state = {**observer_state(prepared), **rounded_pointwise(moments)}
    import datetime

    meta = {"method": "static int8: per-tensor activation ranges (histogram calibration), per-channel weights; "
                      "7-bit 1x1 weights for our AVX2 kernel GPTQ-rounded on the calibration images",
            "engine": STATIC_ENGINE, "images": images, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(info or {})}
    quantized = StaticInt8(model.eval().cpu().float(), state, meta)
    object.__setattr__(quantized, "state", state)
    return quantized


_ROUNDED_KEY = "pointwise_int7."


def _pointwise_convs(prepared: nn.Module) -> dict[str, nn.Conv2d]:
    """The 1x1 convs of a prepared model that :func:`with_cpu_kernels` runs on our GEMM (batch norm
    folded in; the conv itself where the graph calls a conv + ReLU), by the name the graph calls."""
    found = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = prepared.get_submodule(node.target)
        conv = module[0] if isinstance(module, nn.Sequential) and len(module) else module
        if type(conv) is nn.Conv2d and is_pointwise(conv) and conv.in_channels % 8 == 0:
            found[node.target] = conv
    return found


def rounded_pointwise(moments: InputMoments) -> dict[str, torch.Tensor]:
    """The 7-bit weights of each 1x1 conv ``moments`` watched, GPTQ-rounded under its inputs'
    second moment (:mod:`.rounding`), as state tensors: ``pointwise_int7.<name>.weight`` (N, K)
    int8 and ``.scale`` (N,) float32."""
    state = {}
    for name, conv in moments.convs.items():
        weight = conv.weight.detach().float().flatten(1)  # (N, K)
        scale, _ = round_to_7bit(weight)
        state[f"{_ROUNDED_KEY}{name}.weight"] = gptq_round(weight, moments.moments[name], scale)
        state[f"{_ROUNDED_KEY}{name}.scale"] = scale
    return state


def _rounded_from_state(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (q, scale)}`` from the state tensors :func:`rounded_pointwise` wrote."""
    names = {k[len(_ROUNDED_KEY):].rpartition(".")[0] for k in state if k.startswith(_ROUNDED_KEY)}
    rounded = {}
    for name in names:
        q, scale = (state.get(f"{_ROUNDED_KEY}{name}.{part}") for part in ("weight", "scale"))
        if q is None or scale is None:
            raise ValueError(f"int8 calibration state has a partial 7-bit weight for {name}")
        rounded[name] = (q, scale)
    return rounded


def int8_model(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """``model`` itself, or its :class:`StaticInt8` form when it carries the calibration of a file
    ``xception quantize`` wrote (``model.int8_calibration``) and ``device`` is the CPU. On another
    device the fp32 weights run, with a warning: the int8 kernels are CPU kernels."""
    calibration = getattr(model, "int8_calibration", None)
    if calibration is None:
        return model
    if torch.device(device).type != "cpu":
        log.warning("int8 weights run on the CPU; using their fp32 weights on %s", device)
        return model
    try:
        quantized = StaticInt8(model.eval().cpu().float(), calibration["state"], calibration["info"])
    except ValueError as e:  # name the file the calibration came from
        raise ValueError(f"{calibration.get('path', 'int8 weights')}: {e}") from None
    log.info("running static int8 (%s, calibrated on %s images of %s)", STATIC_ENGINE,
             calibration["info"].get("images"), calibration["info"].get("calibration_data", "?"))
    return quantized


def save_int8(quantized: StaticInt8, path, **kwargs):
    """Write a :class:`StaticInt8` as our ``.safetensors``: the fp32 weights, the preprocessing and
    class names, and the calibration (observer states and how it was made). Any command taking
    ``--weights`` reads it; on a CPU, predict / eval / bench run it in int8."""
    from ..weights import save_safetensors

    state = getattr(quantized, "state", None)
    if state is None:
        raise ValueError("this int8 model does not hold its calibration state")
    return save_safetensors(quantized.float_model, path, int8={"state": state, "info": quantized.info}, **kwargs)

