"""Public weight files (where they live, how to verify them, how their models preprocess) and
the download that fetches them into the torch hub cache."""

from __future__ import annotations

import hashlib
import logging
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..fileio import atomic_path
from ..preprocessing import Preprocessing

log = logging.getLogger(__name__)

# Keras Applications preprocess with x / 127.5 - 1 at 299 and resize without a crop margin.
KERAS_PREPROCESSING = Preprocessing(image_size=299, crop_pct=1.0, interpolation="bilinear")
# timm's pretrained configs for the files in its layout (evaluation settings of each model's
# default tag: legacy_xception.tf_in1k 0.8975; xception41/71.tf_in1k 0.903; the ra3 ones 0.94).
TIMM_PREPROCESSING: dict[str, Preprocessing] = {
    "xception": Preprocessing(crop_pct=0.8975),
    "xception41": Preprocessing(crop_pct=0.903),
    "xception71": Preprocessing(crop_pct=0.903),
    "xception65": Preprocessing(crop_pct=0.94),
    "xception41p": Preprocessing(crop_pct=0.94),
    "xception65p": Preprocessing(crop_pct=0.94),
}


@dataclass(frozen=True)
class RemoteWeights:
    """A public weight file: where it lives, how to verify it, how its model preprocesses.

    Args:
        url: download address; the file keeps the address's base name in the cache.
        md5: full md5 hex digest (Keras publishes these), or
        sha256_prefix: leading hex digits of the sha256 (torch.hub style, in the file name).
        preprocessing: the inputs the weights were trained and evaluated with.
    """

    url: str
    md5: str | None = None
    sha256_prefix: str | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def verify(self, path: Path) -> bool:
        algorithm, expected = ("md5", self.md5) if self.md5 else ("sha256", self.sha256_prefix)
        if not expected:
            raise ValueError(f"no checksum recorded for {self.url}")
        digest = hashlib.new(algorithm)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest().startswith(expected.lower())


_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/xception/"
REMOTE_WEIGHTS: dict[str, RemoteWeights] = {
    "keras": RemoteWeights(_KERAS_URL + "xception_weights_tf_dim_ordering_tf_kernels.h5",
                           md5="0a58e3b7378bc2990ea3b43d5981f1f6", preprocessing=KERAS_PREPROCESSING),
    "keras_notop": RemoteWeights(_KERAS_URL + "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                 md5="b0042744bf5b25fce3cb969f33bebb97", preprocessing=KERAS_PREPROCESSING),
    "timm": RemoteWeights("https://github.com/rwightman/pytorch-image-models/releases/download/"
                          "v0.1-cadene/xception-43020ad28.pth", sha256_prefix="43020ad28",
                          preprocessing=TIMM_PREPROCESSING["xception"]),
}


def download_weights(source: str, *, progress: bool = True) -> Path:
    """Fetch ``REMOTE_WEIGHTS[source]`` into ``torch.hub.get_dir()/checkpoints``, verified.

    A cached file that passes the checksum is reused. The download is written atomically and
    takes the final name only once verified, so no half or corrupt file is ever left.
    """
    if source not in REMOTE_WEIGHTS:
        raise ValueError(f"unknown weights {source!r}; named sources: {', '.join(REMOTE_WEIGHTS)}")
    remote = REMOTE_WEIGHTS[source]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / remote.filename
    if target.is_file():
        if remote.verify(target):
            log.info("using cached %s", target)
            return target
        log.warning("cached %s fails its checksum; downloading it again", target)

    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", remote.url, target)
    with atomic_path(target, suffix=".part") as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(remote.url) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=remote.filename, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        if not remote.verify(tmp):
            raise ValueError(f"checksum mismatch for {remote.url}: the download is corrupt; nothing was kept")
    return target
