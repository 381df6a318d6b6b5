"""Static int8 for the CPU (:func:`calibrate_static`, :class:`StaticInt8`): every conv in int8 with
activation ranges calibrated on images (FX graph-mode quantization, :mod:`.prepare`), activations
int8 between layers. Its depthwise and 1x1 convs run on our own AVX2 kernels where they build
(:mod:`.kernel_graph`), the rest on PyTorch's quantized kernels (oneDNN). A calibration is saved
with the fp32 weights (:func:`save_int8`) and rebuilt from them (:func:`int8_model`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .dynamic import is_pointwise
from .kernel_graph import fits_7bit, with_cpu_kernels
from .prepare import STATIC_ENGINE, activation_qconfig, observer_state, prepare_static, quantized_engine
from .rounding import InputMoments, gptq_round, round_to_7bit

log = logging.getLogger(__name__)


class StaticInt8(nn.Module):
    """A model run by PyTorch's quantized CPU kernels: int8 weights (per output channel) and int8
    activations (per tensor, ranges from calibration) through every conv, batch norms fused,
    ReLUs and residual adds on int8 tensors; the global pool and the classifier in fp32.

    ``float_model`` is the fp32 model it was made from (Grad-CAM and export use it). The quantized
    graph is kept out of the module tree, so ``.to()`` never touches its packed weights; it runs on
    the CPU only. Where our CPU kernels can run (:mod:`xception.deploy.kernels`), the depthwise and (with
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
            if name not in convs or not fits_7bit(convs[name], q, scale):
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
    from ...weights import save_safetensors

    state = getattr(quantized, "state", None)
    if state is None:
        raise ValueError("this int8 model does not hold its calibration state")
    return save_safetensors(quantized.float_model, path, int8={"state": state, "info": quantized.info}, **kwargs)
