"""Which samples each rank reads, in which order, under which augmentation seed.

Every sample is transformed under its own seed, derived from (seed, epoch, index) by
:class:`EpochSampler`, so the augmentation of a sample does not depend on the loader's workers
or on where an interrupted epoch was resumed. Datasets are read through keys: a sampler yields
``(index, seed)`` and :class:`IndexedDataset` answers ``(image, target, index)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, TypeVar

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

T = TypeVar("T")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (SplitMix-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return (x ^ (x >> 29)) & (2**63 - 1)


class EpochSampler(Sampler):
    """Shards and shuffles like ``DistributedSampler``, yields ``(index, sample_seed)``.

    ``set_epoch(epoch, start=k)`` skips this rank's first ``k`` samples of the epoch: that is how
    an epoch interrupted after ``k`` samples resumes exactly where it stopped.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                        seed=seed, drop_last=False)
        self.seed = seed
        self.epoch = 0
        self.start = 0

    @property
    def epoch_length(self) -> int:
        """This rank's samples in a whole epoch."""
        return len(self.inner)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.inner) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i, index in enumerate(self.inner):
            if i >= self.start:
                yield index, sample_seed(self.seed, self.epoch, index)


class ShardSampler(Sampler):
    """Every ``num_replicas``-th index from ``rank``, in order, without padding (for evaluation)."""

    def __init__(self, length: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, length, num_replicas))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, None]]:
        return iter([(i, None) for i in self.indices])


class IndexedDataset(Dataset):
    """Wraps a dataset to take ``(index, seed)`` keys and return ``(image, target, index)``.

    With a seed the transform runs under ``torch.manual_seed(seed)`` in a forked RNG, leaving the
    caller's random state untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[Any, int, int]:
        index, seed = key
        img, target = seeded(seed, lambda: self.dataset[index])
        return img, target, index


def seeded(seed: int | None, fn: Callable[[], T]) -> T:
    """``fn()`` under ``torch.manual_seed(seed)`` in a forked RNG (the caller's state is left as it
    was); without a seed, a plain call."""
    if seed is None:
        return fn()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()
