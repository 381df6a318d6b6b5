"""WebDataset tar shards: written from a class-folder tree, streamed for training and evaluation.

Millions of small image files are slow on network file systems; a few hundred tar files stream at
the storage's full bandwidth, from a shared file system or, through ``pipe:`` commands, from
object storage. ``xception shard DIR OUT --shard-size N`` (:func:`write_shards`) writes::

    OUT/train-000000.tar ...   N samples each: KEY.<ext> (the image file's bytes, unchanged) + KEY.cls
    OUT/val-000000.tar ...     (a flat DIR/<class>/ tree without --val-split: OUT/data-*.tar)
    OUT/train.txt, val.txt     list files, one shard per line
    OUT/shards.json            {"format": "xception-shards", "classes": [...], "shards": {name: count}}

KEY is the sample's index in its split: its position across the split's shards. A training split
is written in a fixed shuffled order (seed 0), so that every shard mixes the classes: class
folders come sorted, and a stream is shuffled only within a buffer (a shard of one class would
give batches of one class). A validation split keeps the folder dataset's order, so evaluating on
its shards reads the images in the same order as on the folder. Training and ``eval`` take the shards as a
brace pattern (``OUT/train-{000000..000099}.tar``) or a list file (one URL per line, relative
paths relative to the list file); a URL is a local path or a ``pipe:`` command whose output is
the tar (``pipe:aws s3 cp s3://bucket/train-000000.tar -``). ``shards.json`` is read from beside
the list file, else beside the first shard (a local path, or the path a ``pipe:`` command names).

What an epoch is on a stream (:class:`StreamSampler`): rank ``r`` of ``W`` reads shards ``r``,
``r + W``, ... of the list, always the same ones. An epoch is ``L`` samples on every rank, ``L``
the smallest number of samples a rank holds (all of them in one process), so every rank takes
the same number of steps. Each epoch reads the rank's shards in a new order through a shuffle
buffer of :data:`SHUFFLE_BUFFER` samples, both seeded by (seed, epoch, rank); a rank holding more
than ``L`` samples leaves its surplus out of that epoch (another random part each epoch).

Resume: the checkpoint records how many samples each rank took in the unfinished epoch; the
resumed rank replays the same epoch order and skips that many samples before decoding anything
(their bytes are read again, not decoded), so a resumed stream run continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from itertools import accumulate, islice
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

from PIL import Image
from torch.utils.data import Dataset, Sampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..extras import require
from ..fileio import atomic_path, atomic_write
from .datasets import DIGITS, SafeImageFolder, folder_split
from .images import load_or_unreadable, open_image
from .sampling import sample_seed, seeded

log = logging.getLogger(__name__)

FORMAT = "xception-shards"
INFO = "shards.json"
SHUFFLE_BUFFER = 1000  # samples (encoded bytes, ~110 kB each on ImageNet) held to shuffle a rank's stream
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)  # what ImageFolder reads
_TAR_PATH = re.compile(r"""[^\s'"]*\.tar[^\s'"/]*""")


def webdataset() -> ModuleType:
    """The ``webdataset`` module, or a one-line error naming ``pip install "xception[shards]"``."""
    return require("webdataset", "shards", "sharded (WebDataset) data")


def is_shard_spec(data: str | os.PathLike) -> bool:
    """Whether ``data`` names shards (a ``pipe:`` command, a path or pattern with ``.tar``, a list
    file) rather than ``digits`` or a folder."""
    text = str(data)
    if text == DIGITS or Path(text).is_dir():
        return False
    return text.startswith("pipe:") or ".tar" in text or Path(text).is_file()


def _shard_path(url: str) -> str:
    """The shard's own path or address: ``url`` itself, or the ``.tar`` a ``pipe:`` command names."""
    if not url.startswith("pipe:"):
        return url
    found = _TAR_PATH.findall(url[5:])
    return found[-1] if found else url


def shard_name(url: str) -> str:
    """The file name by which ``shards.json`` counts a shard's samples."""
    return _shard_path(url).rstrip("/").rsplit("/", 1)[-1]


def _local_path(url: str) -> Path | None:
    path = _shard_path(url)
    return None if "://" in path or path.startswith("pipe:") else Path(path)


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split: URLs in list order, the samples each holds, the class names."""

    spec: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def offsets(self) -> list[int]:
        """Index of each shard's first sample in the split."""
        return [0, *accumulate(self.counts)][:-1]


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a shard list file (one shard URL per line): {e}") from None
    urls = []
    for line in (x.strip() for x in lines):
        if not line or line.startswith("#"):
            continue
        relative = not line.startswith("pipe:") and "://" not in line and not Path(line).is_absolute()
        urls.append(str(path.parent / line) if relative else line)
    return urls


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
        ok = info.get("format") == FORMAT and isinstance(info["classes"], list) and isinstance(info["shards"], dict)
    except (ValueError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: not an xception shard index ('format': '{FORMAT}', 'classes', 'shards')")
    return info


def open_shards(spec: str) -> ShardSet:
    """The shards ``spec`` names (brace pattern or list file) with their counts and classes."""
    wds = webdataset()
    listed = Path(spec).is_file() and not spec.endswith(".tar")
    urls = _read_list(Path(spec)) if listed else wds.shardlists.expand_urls(spec)
    if not urls:
        raise ValueError(f"{spec}: names no shards")
    first = _local_path(urls[0])
    places = ([Path(spec).parent] if listed else []) + ([first.parent] if first is not None else [])
    info_path = next((d / INFO for d in places if (d / INFO).is_file()), None)
    if info_path is None:
        raise FileNotFoundError(f"no {INFO} (class list and sample counts, written by `xception shard`) beside {spec}")
    info = _read_info(info_path)
    counts = []
    for url in urls:
        local = _local_path(url)
        if local is not None and not url.startswith("pipe:") and not local.is_file():
            raise FileNotFoundError(f"shard not found: {url}")
        if shard_name(url) not in info["shards"]:
            raise ValueError(f"{info_path} has no sample count for shard {shard_name(url)} ({url})")
        counts.append(int(info["shards"][shard_name(url)]))
    return ShardSet(spec, tuple(urls), tuple(counts), tuple(info["classes"]))


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawSample:
    """One sample as read from a shard, not yet decoded."""

    index: int  # position in the split: the shard's offset + the position in the shard
    target: int
    data: bytes  # the image file's bytes
    name: str  # "URL#KEY", for messages


class ShardError(ValueError):
    """A shard's contents do not match ``shards.json`` or the sample format."""


def read_shard(url: str, offset: int, count: int, num_classes: int) -> Iterator[RawSample]:
    """The samples of one shard, in order; an error when it does not hold ``count`` of them."""
    wds = webdataset()
    n, stream = 0, None
    try:
        stream = wds.gopen(url)
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        for sample in wds.tariterators.group_by_keys(files):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            name = f"{url}#{sample['__key__']}"
            if ext is None or "cls" not in sample:
                raise ShardError(f"{name}: a sample needs an image ({', '.join(IMAGE_EXTS)}) and a cls entry, "
                                 f"has {', '.join(k for k in sample if not k.startswith('__'))}")
            target = int(sample["cls"])
            if not 0 <= target < num_classes or n >= count:
                raise ShardError(f"{name}: class {target} of {num_classes}, sample {n + 1} of {count}: "
                                 f"the shard does not match {INFO}")
            yield RawSample(offset + n, target, sample[ext], name)
            n += 1
        stream.close()  # a failed pipe: command reports here
    except ShardError:
        raise
    except Exception as e:  # missing file, failed command, truncated tar, ...
        detail = str(e.args[0]) if e.args else type(e).__name__
        raise OSError(f"cannot read shard {url}: {detail}") from None
    finally:
        if stream is not None:  # also after an early stop (end of an epoch's share): close quietly
            with contextlib.suppress(Exception):
                stream.close()
    if n != count:
        raise ShardError(f"shard {url} holds {n} samples, {INFO} says {count}")


class ShardDataset(Dataset):
    """Decodes and transforms the :class:`RawSample` keys a :class:`StreamSampler` yields.

    ``dataset[(raw, seed)]`` -> ``(image | Unreadable, target, index)``, like
    :class:`~.sampling.IndexedDataset`: the transform runs under ``seed``.
    """

    def __init__(self, shards: ShardSet, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.shards, self.transform = shards, transform
        self.classes = list(shards.classes)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, key: tuple[RawSample, int | None]) -> tuple[Any, int, int]:
        raw, seed = key
        return seeded(seed, lambda: self._decode(raw)), raw.target, raw.index

    def _decode(self, raw: RawSample) -> Any:
        def load():
            img = open_image(raw.data, raw.name)
            return self.transform(img) if self.transform is not None else img

        return load_or_unreadable(load, raw.name)


class StreamSampler(Sampler):
    """This rank's share of a :class:`ShardSet`, yielded as ``(RawSample, seed)`` keys.

    ``shuffle`` (training): a fixed set of shards per rank, ``epoch_length`` samples per epoch
    (equal on every rank), shards and samples shuffled per epoch, per-sample augmentation seeds;
    ``set_epoch(epoch, start=k)`` skips the first ``k`` without decoding them. Without
    ``shuffle`` (evaluation): every sample of the rank's shards, in list order, no seeds.
    """

    def __init__(self, shards: ShardSet, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, buffer: int = SHUFFLE_BUFFER) -> None:
        self.shards, self.rank, self.shuffle, self.seed, self.buffer = shards, rank, shuffle, seed, buffer
        self.mine = list(range(rank, len(shards.urls), num_replicas))
        held = [sum(shards.counts[r::num_replicas]) for r in range(num_replicas)]
        if shuffle and min(held) == 0:
            raise ValueError(f"{shards.spec}: {len(shards.urls)} shard(s) for {num_replicas} ranks: every rank "
                             "needs a shard (write smaller shards)")
        self.epoch_length = min(held) if shuffle else held[rank]
        self.left_out = sum(held) - num_replicas * self.epoch_length if shuffle else 0
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.epoch_length - self.start

    def __iter__(self) -> Iterator[tuple[RawSample, int | None]]:
        order = list(self.mine)
        rng = random.Random(sample_seed(self.seed, self.epoch, -1 - self.rank))
        if self.shuffle:
            rng.shuffle(order)
        offsets, n = self.shards.offsets, len(self.shards.classes)
        stream: Iterator[RawSample] = (raw for i in order
                                       for raw in read_shard(self.shards.urls[i], offsets[i], self.shards.counts[i], n))
        if self.shuffle:
            stream = islice(webdataset().filters.shuffle(self.buffer, rng=rng)(stream), self.epoch_length)
        for raw in islice(stream, self.start, None):
            yield raw, sample_seed(self.seed, self.epoch, raw.index) if self.shuffle else None


# --- writing --------------------------------------------------------------------------------------


def _files(dataset: Dataset) -> list[tuple[str, int]]:
    """``(path, class index)`` of an image folder or a subset of one, in dataset order."""
    if isinstance(dataset, Subset):
        return [dataset.dataset.samples[i] for i in dataset.indices]  # type: ignore[attr-defined]
    return list(dataset.samples)  # type: ignore[attr-defined]


def write_shards(src: str | os.PathLike, out: str | os.PathLike, *, shard_size: int,
                 val_split: float | None = None) -> dict[str, Any]:
    """Write the images of a class-folder tree as shards (layout in the module docstring).

    ``src``: ``SRC/train/<class>/*`` + ``SRC/val/<class>/*``, or ``SRC/<class>/*`` (split by
    ``val_split`` as ``xception train`` splits it, else one split named ``data``). The image
    files' bytes go in unchanged; ``train`` and ``data`` in a shuffled order (seed 0), ``val`` in
    folder order. Each file is written atomically. Returns what was written.
    """
    wds = webdataset()
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    src, out = Path(src), Path(out)
    if str(src) == DIGITS or not src.is_dir():
        raise FileNotFoundError(f"image folder not found: {src} (xception shard reads a folder of class folders)")
    if (src / "train").is_dir() or val_split is not None:
        train = folder_split(src, "train", val_split=val_split)
        parts = {"train": train, "val": folder_split(src, "val", val_split=val_split, classes=train.classes)}
        classes = train.classes
    else:
        folder = SafeImageFolder(src)
        parts, classes = {"data": folder}, folder.classes
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    lists: dict[str, list[str]] = {}
    for split, dataset in parts.items():
        files = _files(dataset)
        if split != "val":
            random.Random(0).shuffle(files)  # classes mixed within every shard
        lists[split] = []
        for start in range(0, len(files), shard_size):
            name = f"{split}-{start // shard_size:06d}.tar"
            chunk = files[start:start + shard_size]
            with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
                with wds.TarWriter(f, mtime=0) as sink:  # an int: no PAX header per member
                    for index, (path, target) in enumerate(chunk, start):
                        ext = Path(path).suffix.lower().lstrip(".")
                        sink.write({"__key__": f"{index:08d}", ext: Path(path).read_bytes(), "cls": target})
                f.flush()
                os.fsync(f.fileno())
            counts[name] = len(chunk)
            lists[split].append(name)
        text = "".join(name + "\n" for name in lists[split])
        atomic_write(out / f"{split}.txt", lambda f: f.write(text), mode="w")
        log.info("%s: %d images in %d shard(s) -> %s/%s-*.tar, list %s.txt", split, len(files), len(lists[split]),
                 out, split, split)
    info = json.dumps({"format": FORMAT, "classes": classes, "shards": counts}, indent=1)
    atomic_write(out / INFO, lambda f: f.write(info), mode="w")
    return {"out": str(out), "classes": classes, "splits": {s: {"shards": names, "images": sum(counts[n] for n in names)}
                                                            for s, names in lists.items()}}
