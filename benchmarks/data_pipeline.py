"""Images/s of the training data pipeline alone (read + decode + augmentation + collation), folders vs shards.

    PYTHONPATH=src python benchmarks/data_pipeline.py [--images 256] [--rounds 3] [--workers 0] [--json OUT]

The images are real photographs (scikit-learn's two sample JPEGs, 427x640) cut into 500x375
crops at their native resolution (ImageNet's most common size) and saved as JPEG quality 95
(mean ~75 KiB; ImageNet's train files average ~110 KB), so that decoding costs about what it costs
on ImageNet. Both pipelines are what ``xception train`` runs: an image folder through
``EpochSampler`` + ``IndexedDataset``, and the same images as WebDataset shards (written by
``write_shards``) through ``StreamSampler`` + ``ShardDataset``, each with the default training
transform (random-resized crop to 299, flip, normalise) and a DataLoader of batch 64. With
``--workers 0`` everything runs in this process on one intra-op thread: images/s per CPU core.
Rounds alternate folder and shards; the median round is reported, with the cores it takes to
feed timm's H100 training speed (legacy_xception, bs128 bf16 channels-last: 1,586 images/s eager,
1,647 compiled; ``../shared/REFERENCE.md``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from xception.preprocessing import Preprocessing
from xception.data.datasets import SafeImageFolder
from xception.data.images import collate_skip
from xception.data.shards import ShardDataset, open_shards, write_shards
from xception.data.splits import keyed

TARGETS = {"eager": 1586.0, "compiled": 1647.0}  # timm legacy_xception training images/s on one H100


def make_photos(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG crops (500x375, quality 95) of scikit-learn's sample photos, two classes."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # china.jpg, flower.jpg: (427, 640, 3) uint8
    for i in range(n):
        c = i % len(photos)
        x, y = int(rng.integers(0, 640 - 500 + 1)), int(rng.integers(0, 427 - 375 + 1))
        crop = Image.fromarray(photos[c]).crop((x, y, x + 500, y + 375))  # native resolution
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:05d}.jpg", quality=95)
    return root


def time_loader(dataset, sampler, batch_size: int, workers: int) -> float:
    """Images/s of one pass over ``sampler`` through a DataLoader."""
    sampler.set_epoch(0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate_skip)
    t0 = time.perf_counter()
    count = sum(len(batch[1]) for batch in loader)
    return count / (time.perf_counter() - t0)


def _drain(queue: mp.Queue, batches: int) -> None:
    for _ in range(batches):
        queue.get()


def time_stream(sampler) -> float:
    """Samples/s of reading and shuffling the shard stream alone (``StreamSampler``, no decode)."""
    sampler.set_epoch(0)
    t0 = time.perf_counter()
    n = sum(1 for _ in sampler)
    return n / (time.perf_counter() - t0)


def time_reader(sampler, batch_size: int) -> float:
    """Samples/s of what the training process itself does for shards: read and shuffle the stream
    (``StreamSampler``) and hand each batch of encoded samples to a worker process (the DataLoader's
    index queue), without decoding."""
    sampler.set_epoch(0)
    queue: mp.Queue = mp.Queue()
    worker = mp.Process(target=_drain, args=(queue, -(-len(sampler) // batch_size)))
    worker.start()
    t0 = time.perf_counter()
    n, batch = 0, []
    for key in sampler:
        batch.append(key)
        if len(batch) == batch_size:
            queue.put(batch)
            n, batch = n + len(batch), []
    if batch:
        queue.put(batch)
        n += len(batch)
    worker.join()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: this process = one core)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transform = Preprocessing(image_size=args.image_size).train_transform()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_photos(Path(tmp) / "photos", args.images)
        write_shards(root / "train", Path(tmp) / "shards", shard_size=64)
        files = sorted((root / "train").rglob("*.jpg"))
        mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1024
        pipelines = {
            "folder": keyed(SafeImageFolder(root / "train", transform), train=True),
            "shards": keyed(ShardDataset(open_shards(f"{tmp}/shards/data.txt"), transform), train=True),
        }
        rates: dict[str, list[float]] = {name: [] for name in pipelines}
        for name, (dataset, sampler) in pipelines.items():  # warm-up: page cache, first imports
            time_loader(dataset, sampler, args.batch_size, args.workers)
        reader: list[float] = []
        stream: list[float] = []
        for _ in range(args.rounds):
            for name, (dataset, sampler) in pipelines.items():
                rates[name].append(time_loader(dataset, sampler, args.batch_size, args.workers))
            reader.append(time_reader(pipelines["shards"][1], args.batch_size))
            stream.append(time_stream(pipelines["shards"][1]))
    cores = max(args.workers, 1)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "torch": torch.__version__,
        "pillow": Image.__version__, "images": args.images, "mean_jpeg_kb": round(mean_kb, 1), "workers": args.workers,
        "image_size": args.image_size, "rounds": rates, "shard_reader_rounds": reader,
        "shard_reader_samples_per_s": statistics.median(reader), "shard_stream_rounds": stream,
        "shard_stream_samples_per_s": statistics.median(stream),
        "results": {name: {"images_per_s": statistics.median(r), "images_per_s_per_core": statistics.median(r) / cores,
                           "cores_to_feed": {k: v / (statistics.median(r) / cores) for k, v in TARGETS.items()}}
                    for name, r in rates.items()},
    }
    print(f"{args.images} JPEGs of 500x375 (mean {mean_kb:.0f} KiB), {args.image_size} px, workers {args.workers}, "
          f"load {report['load_avg_1min']:.2f}")
    print("| pipeline | images/s | per core | cores for 1,586 (eager) | cores for 1,647 (compiled) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in report["results"].items():
        print(f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s_per_core']:.1f} | "
              f"{r['cores_to_feed']['eager']:.1f} | {r['cores_to_feed']['compiled']:.1f} |")
    for key, what in (("shard_stream_samples_per_s", "read + shuffle"),
                      ("shard_reader_samples_per_s", "read + shuffle + hand each batch to a worker process")):
        r = report[key]
        print(f"shards, the training process's own share ({what}, no decode): {r:.0f} samples/s = "
              f"{100 * TARGETS['eager'] / r:.0f}% of one core at 1,586 images/s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
