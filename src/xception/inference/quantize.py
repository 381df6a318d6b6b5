"""Int8 pointwise convolutions: the CPU path past the bf16 arithmetic ceiling.

Xception's 1x1 convolutions hold about 7.8 of its 8.4 GMACs. On a CPU with AVX-512 VNNI an
int8 x int8 -> int32 matrix product runs about twice as fast as the same product in bf16 (this
project's 2-core EPYC: ~410 vs ~200 GMAC/s at the middle flow's 361x728x728), so
:func:`quantize_pointwise` swaps those convs for :class:`Int8PointwiseConv`:

* weights: symmetric int8 per output channel (scale = max |w| / 127), computed once;
* activations: symmetric int8 per pixel, scales computed on every call (dynamic quantization:
  no calibration data, and nothing depends on inputs seen before);
* ``y = int_mm(q_x, q_w) * s_pixel * s_channel + bias``, returned in the input's dtype.

Everything else (stem, depthwise convs, pools, head) stays in the model's floating dtype. Under
``torch.compile`` the per-pixel quantization and the rescale fuse with the neighbouring ReLU,
residual add and dtype casts. Convs with few input channels stay in floating point: their
products are cheap and the int32 output would cost more memory traffic than the int8 saves.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

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


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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


class StaticInt8(nn.Module):
    """A model run by PyTorch's quantized CPU kernels: int8 weights (per output channel) and int8
    activations (per tensor, ranges from calibration) through every conv, batch norms fused,
    ReLUs and residual adds on int8 tensors; the global pool and the classifier in fp32.

    ``float_model`` is the fp32 model it was made from (Grad-CAM and export use it). The quantized
    graph is kept out of the module tree, so ``.to()`` never touches its packed weights; it runs on
    the CPU only.
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
        with warnings.catch_warnings(), quantized_engine(STATIC_ENGINE):
            # the engine active here picks the kernels: weights are packed for it once, now
            warnings.simplefilter("ignore")
            object.__setattr__(self, "_quantized", convert_fx(prepared))
        for name in ("class_names", "preprocessing", "num_classes", "config", "model_name"):
            if hasattr(float_model, name):
                object.__setattr__(self, name, getattr(float_model, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"the int8 model runs on the CPU, got an input on {x.device}")
        x = x.float().contiguous()
        with torch.no_grad(), quantized_engine(STATIC_ENGINE):
            frozen = self._frozen(x) if self.frozen else None
            return frozen(x) if frozen is not None else self.float_model.forward_head(self._quantized(x))

    # Run through a traced, frozen TorchScript graph per input shape (the same ops without the
    # Python interpreter between them: 80 ms against 91 ms per 299 px image on the AVX2 machine,
    # identical outputs). A few shapes are kept; tracing takes ~1 s. ``frozen = False`` turns it off.
    frozen = True
    MAX_FROZEN_SHAPES = 4

    def _frozen(self, x: torch.Tensor):
        import warnings

        cache = self.__dict__.setdefault("_frozen_graphs", {})
        key = tuple(x.shape)
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
                f"calibration={self.info.get('images')} images")

    def traceable(self) -> nn.Module:
        """The same function as a plain module (quantized features, fp32 head) for ``torch.jit.trace``."""
        return _Traceable(self._quantized, self.float_model)


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

    prepared = None
    images = 0
    for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
        batch = batch.cpu().float()
        if prepared is None:
            prepared = prepare_static(model, batch[:1])
        prepared(batch)
        images += batch.shape[0]
    if prepared is None:
        raise ValueError("int8 calibration needs at least one batch of images")
    state = observer_state(prepared)
    import datetime

    meta = {"method": "static int8: per-tensor activation ranges (histogram calibration), per-channel weights",
            "engine": STATIC_ENGINE, "images": images, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(info or {})}
    quantized = StaticInt8(model.eval().cpu().float(), state, meta)
    object.__setattr__(quantized, "state", state)
    return quantized


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

