"""Fast inference: ``optimize(model, device=..., dtype=...)`` returns a module that computes the
same function as ``model.eval()``, faster.

What it does, in order:

1. **Fold batch norms** into the convolution before them (:func:`fold_batchnorms`), found by
   running the model once with hooks, so any conv -> BN pair is found whatever the module
   structure (stride, dilation, groups, depthwise or not). The folded copy is checked against
   the original on that same input.
2. **Channels-last and the requested dtype** (fp32, bf16, fp16) for weights and activations.
3. One of the **modes** below; :data:`MODES` lists them.

   * ``"eager"``: 1 + 2, run eagerly (oneDNN on CPU, cuDNN on GPU).
   * ``"compile"``: ``torch.compile`` with Inductor's freezing (weights become constants,
     conv + bias + ReLU and adds fuse). Compiling takes a while (minutes on a small CPU); it
     happens on the first call of each input shape, or in :func:`optimize` if ``example_shape``
     is given.
   * ``"fused"``: the seed :class:`~xception.model.Xception` run by the fused Triton kernels of
     :mod:`xception.kernels` (separable conv + bias + ReLUs + residual in one kernel, max-pool +
     skip conv + add in another). On a CPU it runs the kernels' PyTorch references (correct, not
     fast). Models of another structure fall back to ``"eager"``.
   * ``"auto"``: ``"fused"`` on CUDA for the seed architecture, else ``"compile"``.

   On CUDA, ``cuda_graphs=True`` replays a captured CUDA graph per input shape (batch-1 latency).

``dtype="int8"`` (CPU, modes eager and compile) runs the 1x1 convolutions as int8 x int8 -> int32
products with per-pixel dynamic activation scales and per-channel weight scales
(:mod:`xception.quantize`), and everything else in bf16. It is held to the bf16 parity bound.

The returned module takes and returns tensors like the original (any device, dtype, layout): it
moves the input to the target, and returns the output in the input's dtype on the input's device.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .model import Block, MaxPool2dSame, SeparableConv2d, Xception
from .quantize import quantize_pointwise

log = logging.getLogger(__name__)

MODES = ("eager", "compile", "fused", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The precisions optimize() takes: the float dtypes, and int8 (int8 1x1 convs, the rest bf16).
PRECISIONS = (*DTYPES, "int8")


def resolve_precision(precision: str | torch.dtype) -> tuple[str, torch.dtype]:
    """``(name, activation dtype)`` of a precision: a float dtype (name or torch dtype) or int8."""
    if precision in ("int8", torch.int8):
        return "int8", torch.bfloat16
    for name, dtype in DTYPES.items():
        if precision in (name, dtype):
            return name, dtype
    raise ValueError(f"dtype must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives ``inf``."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    """Give every batch norm random affine parameters and running statistics (in place).

    Freshly built models have identity batch norms, which would hide a wrong fold in tests.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            dev = m.running_mean.device
            r = lambda: torch.rand(n, generator=generator).to(dev)  # noqa: E731
            m.running_mean.copy_((torch.randn(n, generator=generator) * 0.1).to(dev))
            m.running_var.copy_(0.5 + 1.5 * r())
            if m.weight is not None:
                m.weight.copy_(0.5 + r())
                m.bias.copy_((torch.randn(n, generator=generator) * 0.1).to(dev))
    return model


# ---------------------------------------------------------------------------------------------
# 1. Batch-norm folding


def _example_input(model: nn.Module, size: int, device: torch.device) -> torch.Tensor:
    in_chans = getattr(getattr(model, "config", None), "in_chans", None)
    if in_chans is None:  # not one of ours: the first conv says
        in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    return torch.randn(1, in_chans, size, size, device=device)


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Names of (conv, batch norm) pairs where the batch norm reads exactly the conv's output.

    Found by running ``model(example)`` with hooks; modules called more than once are left out
    (their pairing would not be unique).
    """
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keep outputs alive so their ids stay unique
    calls: Counter[str] = Counter()
    pairs: list[tuple[str, str]] = []
    handles = []

    def on_conv(name: str):
        def hook(mod, inp, out):
            calls[name] += 1
            produced[id(out)] = name
            alive.append(out)
        return hook

    def on_bn(name: str):
        def hook(mod, inp):
            calls[name] += 1
            conv = produced.get(id(inp[0]))
            if conv is not None:
                pairs.append((conv, name))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(on_conv(name)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(on_bn(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    convs = Counter(c for c, _ in pairs)
    return [(c, b) for c, b in pairs if calls[c] == 1 and calls[b] == 1 and convs[c] == 1]


@torch.no_grad()
def fold_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv <- bn(conv), in place: scale each output filter, add the shift as the conv's bias."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    b = shift if conv.bias is None else conv.bias.double() * scale + shift
    conv.weight.copy_(w.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)
    else:
        conv.bias.copy_(b.to(conv.bias.dtype))


def fold_batchnorms(model: nn.Module, *, example_size: int = 64, check: bool = True) -> nn.Module:
    """A copy of ``model`` in eval mode with every conv -> BN pair folded into the conv.

    Folded batch norms become ``nn.Identity``; the others (e.g. after a nonlinearity) stay.
    With ``check``, the copy is compared with the original on the example input (fp32) and a
    ``RuntimeError`` is raised if they differ (which would mean a conv output had other readers).
    """
    folded = copy.deepcopy(model).eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = _example_input(model, example_size, device)
    try:
        pairs = find_conv_bn_pairs(folded, example)
    except (RuntimeError, ValueError):  # too small for this model: retry at ImageNet size
        example = _example_input(model, 224, device)
        pairs = find_conv_bn_pairs(folded, example)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        if conv.out_channels != bn.num_features:
            continue
        fold_conv_bn_(conv, bn)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent_name) if parent_name else folded, attr, nn.Identity())
    log.debug("folded %d batch norms", len(pairs))
    if check:
        was_training = model.training
        try:
            with torch.no_grad():
                err = relative_error(folded(example), model.eval()(example))
        finally:
            model.train(was_training)
        if err > 1e-4:
            raise RuntimeError(f"batch-norm folding changed the model's output (relative error {err:.2e})")
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


# ---------------------------------------------------------------------------------------------
# 2. The fused (Triton) network for the seed architecture


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
    """The seed :class:`~xception.model.Xception` (BN folded) run by :mod:`xception.kernels`.

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


# ---------------------------------------------------------------------------------------------
# 3. The returned module


class _Frozen(nn.Module):
    """``torch.compile`` with Inductor's freezing on. Freezing must be set in Inductor's config
    while a graph compiles (passing it in ``torch.compile(options=...)`` was seen not to freeze),
    and compiling happens on the first call of each shape: so every call runs under the patch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)


class _CudaGraphs(nn.Module):
    """Replay one captured CUDA graph per input shape (static input/output buffers)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.graphs: dict[tuple, tuple] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.module(static_in)  # warm-up: autotuning, workspace allocation
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.module(static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()


class OptimizedModel(nn.Module):
    """What :func:`optimize` returns: inference only, input/output like the original model's."""

    def __init__(self, module: nn.Module, *, device: torch.device, dtype: torch.dtype, mode: str,
                 precision: str, compile_seconds: float = 0.0) -> None:
        super().__init__()
        self.module = module
        self.device = device
        self.dtype = dtype  # of the activations
        self.precision = precision  # "fp32" | "bf16" | "fp16" | "int8"
        self.mode = mode
        self.compile_seconds = compile_seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.module(x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last))
        return y.to(x.device, x.dtype if x.is_floating_point() else torch.float32)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, device={str(self.device)!r}, precision={self.precision!r}"


def optimize(
    model: nn.Module,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    mode: str = "auto",
    cuda_graphs: bool = False,
    example_shape: tuple[int, int, int, int] | None = None,
) -> OptimizedModel:
    """A faster module computing ``model.eval()``'s function; the original is not modified.

    Args:
        model: any model of :func:`~xception.list_models` (any conv -> BN structure folds).
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        dtype: ``"fp32"``, ``"bf16"``, ``"fp16"`` (or the torch dtype), or ``"int8"``: int8 1x1
            convs and bf16 elsewhere, CPU only, modes eager and compile (``auto`` is compile,
            ``fused`` falls back to eager).
        mode: one of :data:`MODES`.
        cuda_graphs: replay CUDA graphs (CUDA only; best for small batches).
        example_shape: run one input of this shape now, so compilation and autotuning happen
            here (their time is in ``compile_seconds`` of the result) rather than on first use.
    """
    device = torch.device(device)
    precision, dtype = resolve_precision(dtype)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"dtype 'int8' is a CPU path, got device {str(device)!r} (use bf16 there)")
        if mode == "fused":  # the fused kernels are bf16/fp32 only, like other unsupported structures
            log.warning("fused path unavailable for dtype int8; using mode 'eager'")
            mode = "eager"
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if mode == "auto":
        mode = "fused" if device.type == "cuda" and isinstance(model, Xception) and kernels.HAS_TRITON else "compile"
    if mode == "fused":
        try:
            module: nn.Module = FusedXception(model, dtype).to(device)
        except Unsupported as e:
            log.warning("fused path unavailable (%s); using mode 'eager'", e)
            mode = "eager"
    if mode in ("eager", "compile"):
        module = fold_batchnorms(model)
        if precision == "int8":
            n = quantize_pointwise(module)
            log.debug("%d pointwise convs in int8", n)
        module = module.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    if mode == "compile":
        module = _Frozen(module)
    if cuda_graphs:
        module = _CudaGraphs(module)
    out = OptimizedModel(module, device=device, dtype=dtype, precision=precision,
                         mode=mode + ("+cuda-graphs" if cuda_graphs else ""))
    if example_shape is not None:
        start = time.perf_counter()
        out(torch.randn(example_shape, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.compile_seconds = time.perf_counter() - start
    return out
