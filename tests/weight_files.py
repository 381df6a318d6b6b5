"""Weight files written by hand for the tests, and a loopback HTTP server to serve them.

``keras_layers`` / ``write_keras_h5``: our model in the Keras HDF5 layout (legacy Keras 2 or Keras 3
names), written with h5py alone; ``randomize``: random weights and random batch-norm statistics, so
outputs differ from class to class; ``serve_folder``: a folder over ``http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from torch import nn

import xception


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name else
                        torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


@torch.no_grad()
def keras_layers(model, include_top: bool = True) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Our model as (Keras layer name, {weight leaf: Keras-layout array}) in Keras's layer order."""
    def conv(m):
        return {"kernel": m.weight.permute(2, 3, 1, 0).numpy()}

    def sep(m):
        return {"depthwise_kernel": m.conv1.weight.permute(2, 3, 0, 1).numpy(),
                "pointwise_kernel": m.pointwise.weight.permute(2, 3, 1, 0).numpy()}

    def bn(m):
        return {"gamma": m.weight.numpy(), "beta": m.bias.numpy(),
                "moving_mean": m.running_mean.numpy(), "moving_variance": m.running_var.numpy()}

    layers = [("input_1", {}), ("block1_conv1", conv(model.conv1)), ("block1_conv1_bn", bn(model.bn1)),
              ("block1_conv1_act", {}), ("block1_conv2", conv(model.conv2)), ("block1_conv2_bn", bn(model.bn2))]
    n_skip = 0
    for b, block in enumerate(model.blocks, start=1):
        seps = [m for m in block.rep if isinstance(m, xception.SeparableConv2d)]
        norms = [m for m in block.rep if isinstance(m, nn.BatchNorm2d)]
        for j, (s, n) in enumerate(zip(seps, norms), start=1):
            layers += [(f"block{b + 1}_sepconv{j}", sep(s)), (f"block{b + 1}_sepconv{j}_bn", bn(n))]
        if block.skip is not None:  # Keras 2 numbered the unnamed layers from 1
            n_skip += 1
            layers += [(f"conv2d_{n_skip}", conv(block.skip)), (f"batch_normalization_{n_skip}", bn(block.skipbn)),
                       (f"add_{n_skip}", {})]
    layers += [("block14_sepconv1", sep(model.conv3)), ("block14_sepconv1_bn", bn(model.bn3)),
               ("block14_sepconv2", sep(model.conv4)), ("block14_sepconv2_bn", bn(model.bn4)), ("avg_pool", {})]
    if include_top:
        layers.append(("predictions", {"kernel": model.fc.weight.t().numpy(), "bias": model.fc.bias.numpy()}))
    return layers


def write_keras_h5(model, path: Path, *, suffix: str = ":0", full_model: bool = False,
                   include_top: bool = True) -> Path:
    with h5py.File(path, "w") as f:
        group = f.create_group("model_weights") if full_model else f
        layers = keras_layers(model, include_top)
        group.attrs["layer_names"] = [name.encode() for name, _ in layers]
        for name, tensors in layers:
            g = group.create_group(name)
            names = [f"{name}/{leaf}{suffix}" for leaf in tensors]
            g.attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S")
            for n, value in zip(names, tensors.values()):
                g.create_dataset(n, data=value)
    return path


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``folder`` on 127.0.0.1 (a free port); yield ``(base URL, requested paths)``."""
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()
