"""Class-activation maps (Grad-CAM and its kin); :mod:`xception.plotting` draws them.

The maps come from the grad-cam library (installed with the package). By default they are
taken at the last feature map, ``forward_features``'s output (after the final ReLU: Keras's Grad-CAM
tutorial on Xception uses the same map, ``block14_sepconv2_act``). The seed model runs one shared
``relu`` module many times, so that map is not any single module's output: :class:`FeatureMapModel`
makes it one (``features``) for the library to hook. ``layer="NAME"`` takes any submodule instead.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..preprocessing import Preprocessing

FEATURES = "features"  # the default layer: the last feature map
# Our names -> the library's classes. Score-CAM runs one forward pass per channel: slow on a CPU.
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
           "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}
DEFAULT_METHODS = ("gradcam", "gradcam++")
TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM", "xgradcam": "XGrad-CAM",
          "layercam": "LayerCAM", "eigencam": "Eigen-CAM", "scorecam": "Score-CAM"}


def grad_cam_library():
    """The ``pytorch_grad_cam`` module (imported on first use: it brings OpenCV, slow to import)."""
    import pytorch_grad_cam

    return pytorch_grad_cam


class FeatureMapModel(nn.Module):
    """``model`` with its last feature map as the output of a module, ``features``.

    ``forward`` = ``forward_head(features(forward_features(x)))``: the model's logits.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.features(self.model.forward_features(x)))  # (B, num_classes)


def check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {', '.join(unknown) or 'none'}")
    return list(methods)


def target_layer(wrapped: FeatureMapModel, layer: str | None) -> nn.Module:
    """The module the maps are taken at: ``features`` or a submodule of the model, by name."""
    if layer in (None, FEATURES):
        return wrapped.features
    names = dict(wrapped.model.named_modules())
    if layer not in names or not layer:
        some = [n for n in names if n and "." not in n]
        raise ValueError(f"layer {layer!r} is not a submodule of the model; try {FEATURES!r} (the default) "
                         f"or one of {', '.join(some[:12])}{', ...' if len(some) > 12 else ''}")
    return names[layer]


@contextlib.contextmanager
def _gradients_from(model: nn.Module, module: nn.Module) -> Iterator[None]:
    """Backward runs from the logits to ``module``'s output and no further, and computes no weight
    gradients: the map is all the CAM methods need (on a CPU the depthwise convs' weight gradients
    would cost most of the time). In-place activations are off meanwhile: one downstream would
    rewrite the map."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    switched = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    handle = module.register_forward_hook(lambda m, args, out: out.detach().requires_grad_())
    for p in frozen:
        p.requires_grad_(False)
    for m in switched:
        m.inplace = False
    try:
        yield
    finally:
        handle.remove()
        for p in frozen:
            p.requires_grad_(True)
        for m in switched:
            m.inplace = True


def _check_layer(wrapped: nn.Module, module: nn.Module, layer: str, x: torch.Tensor) -> None:
    """A layer must run once per forward and give a (B, C, H, W) map; else the maps would be wrong."""
    shapes: list[tuple[int, ...]] = []
    handle = module.register_forward_hook(lambda m, i, o: shapes.append(tuple(getattr(o, "shape", ()))))
    try:
        with torch.no_grad():
            wrapped(x[:1])
    finally:
        handle.remove()
    if len(shapes) != 1:
        raise ValueError(f"layer {layer!r} runs {len(shapes)} times per forward pass (a shared module); "
                         "pick a layer that runs once")
    if len(shapes[0]) != 4:
        raise ValueError(f"layer {layer!r} gives a {shapes[0]} output, not a (B, C, H, W) feature map")


def class_activation_maps(model: nn.Module, x: torch.Tensor, targets: Sequence[int], *,
                          methods: Sequence[str] = DEFAULT_METHODS, layer: str | None = None) -> dict[str, np.ndarray]:
    """Maps of the input ``x`` for the class indices ``targets``: of one image (1, 3, H, W) for each
    class, or of each image of a batch (B, 3, H, W) for its own class (B = len(targets)).

    Returns method name -> (len(targets), H, W) float32 maps, each scaled to [0, 1] (all zero
    where no part of the image raises the class score).
    """
    lib = grad_cam_library()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    methods = check_methods(methods)
    wrapped = FeatureMapModel(model).eval()
    module = target_layer(wrapped, layer)
    if x.shape[0] not in (1, len(targets)):
        raise ValueError(f"{x.shape[0]} images for {len(targets)} classes: give one image or one class per image")
    batch = x.expand(len(targets), *x.shape[1:]).contiguous()  # one image: a copy per class, all maps in one pass
    if layer not in (None, FEATURES):
        _check_layer(wrapped, module, layer, x)
    maps = {}
    with _gradients_from(model, module):  # registered before the library's hooks: they see the new map
        for method in methods:
            engine = getattr(lib, METHODS[method])(model=wrapped, target_layers=[module])
            try:
                with torch.enable_grad():
                    maps[method] = engine(input_tensor=batch, targets=[ClassifierOutputTarget(int(t)) for t in targets])
            finally:
                engine.activations_and_grads.release()
    return maps


def to_display(x: torch.Tensor, preprocessing: Preprocessing) -> np.ndarray:
    """A (3, H, W) model input back to an (H, W, 3) image in [0, 1] (the normalisation undone)."""
    mean = torch.tensor(preprocessing.mean, device=x.device)[:, None, None]
    std = torch.tensor(preprocessing.std, device=x.device)[:, None, None]
    return (x.detach().float() * std + mean).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
