"""Feeding a training run: a Dataset through a transform (batch-wise where it can), the seeded sampler that shares an
epoch among processes and can start mid-epoch (a resumed run), and the DataLoader over them, whose worker errors
come back as one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from spot_compile.errors import SpotError


class Prepared(Dataset):
    """`data`'s (image, label) pairs through `transform`; indexed by (index, seed) pairs from `SeededSampler` (the
    transform's random draws are functions of the seed) or by plain indices (no randomness to seed). A DataLoader
    fetches a batch at once (`__getitems__`), which the transform makes batch-wise where it can (`batch`): for IDX
    images one by one cost 20 ms a batch of 128, batch-wise 5 ms (benchmarks/data_path.py)."""

    def __init__(self, data: Dataset, transform: Callable, batched: bool = True) -> None:
        self.data, self.transform, self.batched = data, transform, batched

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.data[index]
        return self.transform(image, f"image {index} of the data", seed), int(label)

    def __getitems__(self, items: list) -> list:
        pairs = [item if isinstance(item, tuple) else (item, None) for item in items]
        raw = [self.data[index] for index, _ in pairs]
        made = self.transform.batch([image for image, _ in raw], [seed for _, seed in pairs]) if self.batched else None
        if made is None:
            return [self[item] for item in items]
        return list(zip(made.unbind(0), (int(label) for _, label in raw)))


class SeededSampler(DistributedSampler):
    """DistributedSampler's shuffle and split among ranks (every world-th index of a permutation drawn from seed and
    epoch), yielding each index with its augmentation seed, and able to start an epoch `skip` images in (a resumed
    run). With one process it is the plain seeded shuffle."""

    def __init__(self, data: Dataset, world_size: int, rank: int, seed: int) -> None:
        super().__init__(data, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def start(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for i, index in enumerate(super().__iter__()):
            if i >= self.skip:
                yield index, (base + index) % (2**63 - 1)

    def __len__(self) -> int:
        return self.num_samples - self.skip


def loader(data: Dataset, batch_size: int, *, sampler=None, workers: int = 0, pin_memory: bool = False,
           drop_last: bool = False) -> DataLoader:
    """A DataLoader over `data`; its workers' own seeds come from a fixed generator, not from torch's global one,
    whose state a resumed run restores (and which the model's noise draws from)."""
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=drop_last, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def reraised(batches: DataLoader) -> Iterator:
    """`batches`, with a spot-compile error raised in a loader worker given back its own one-line message (the
    DataLoader re-raises it with the worker's traceback as the message)."""
    try:
        yield from batches
    except SpotError as e:
        text = str(e)
        if text.startswith("Caught "):
            last = text.rstrip().splitlines()[-1]
            raise type(e)(last.split(": ", 1)[-1]) from None
        raise
