"""``xception predict``: classify image files, folders and globs with any weights (our checkpoints,
``.safetensors``, Keras / timm files), preprocessed as the weights say (flags override it).
Under ``torchrun`` the images are sharded across ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from ..data.images import ImagePaths, collate_skip, expand_inputs
from ..runtime import amp_dtype, autocast, cleanup, setup
from .classify import decode_predictions, load_for_inference


def predict(checkpoint: str | Path, inputs: Sequence[str], *, topk: int = 5, device: str = "auto",
            batch_size: int = 64, workers: int = 2, amp: str = "auto", image_size: int | None = None,
            crop_pct: float | None = None) -> Iterator[dict[str, Any]]:
    """Yield ``{"path", "top": [{"class", "prob"}, ...]}`` or ``{"path", "error"}`` per image.

    ``checkpoint``: any weights (``"keras"``, ``"timm"``, a file, a training checkpoint). ``inputs``
    are files, folders or globs. Results come in input order (this rank's share of the inputs under
    ``torchrun``). A missing, unreadable or non-image input is an error row; the rest are classified.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk!r}")
    env = setup(device)
    try:
        model, classes, preprocessing, _ = load_for_inference(checkpoint, env.device, image_size=image_size,
                                                              crop_pct=crop_pct)
        entries = expand_inputs(inputs)[env.rank::env.world_size]
        paths = [path for path, _ in entries]
        loader = DataLoader(ImagePaths(paths, preprocessing.eval_transform()), batch_size=batch_size,
                            num_workers=workers, collate_fn=collate_skip)
        dtype = amp_dtype(amp, env.device)
        for batch in loader:
            rows: dict[int, dict[str, Any]] = {i: {"path": str(paths[i]), "error": entries[i][1] or bad.reason}
                                               for i, bad in batch.unreadable}
            if len(batch.indices):
                images = batch.images.to(env.device).contiguous(memory_format=torch.channels_last)
                with torch.no_grad(), autocast(env.device, dtype):
                    probs = model(images).float().softmax(dim=1)
                for i, top in zip(batch.indices.tolist(), decode_predictions(probs.cpu(), topk, classes)):
                    rows[i] = {"path": str(paths[i]), "top": [{"class": t.label, "prob": t.prob} for t in top]}
            for i in sorted(rows):
                yield rows[i]
    finally:
        cleanup()
