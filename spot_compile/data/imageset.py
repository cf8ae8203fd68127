"""Labelled images held in memory (`ImageSet`), the one train/validation split rule of every data path, and the
adapters between in-memory images and torch Datasets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset

from spot_compile.errors import DataError


def split(data, val_size: int, seed: int = 0):
    """(train, validation): a fixed random split of one training set (`split_indices`), an `ImageSet` into two
    ImageSets, any other Dataset into two Subsets. Hyperparameters are chosen on the validation part, never on a
    test split."""
    train, val = split_indices(len(data), val_size, seed)
    if isinstance(data, ImageSet):
        return data.subset(train), data.subset(val)
    return Subset(data, train.tolist()), Subset(data, val.tolist())


def classes_of(data: Dataset) -> tuple[str, ...] | None:
    while isinstance(data, Subset):
        data = data.dataset
    classes = getattr(data, "classes", None)
    return tuple(classes) if classes is not None else None


def images_per_class(data: Dataset) -> dict[str, int]:
    """How many of `data`'s images each class has (by name where the data names its classes), read from its labels
    without decoding an image."""
    indices = None
    base = data
    while isinstance(base, Subset):
        indices = [base.indices[i] for i in indices] if indices is not None else list(base.indices)
        base = base.dataset
    labels = getattr(base, "targets", None)
    if labels is None:
        labels = getattr(base, "labels", None)
    if labels is None and isinstance(getattr(base, "data", None), ImageSet):
        labels = base.data.labels
    labels = [int(y) for y in labels] if labels is not None else [int(base[i][1]) for i in range(len(base))]
    if indices is not None:
        labels = [labels[i] for i in indices]
    names = classes_of(data) or ()
    counts: dict[str, int] = {}
    for y in sorted(labels):
        name = names[y] if y < len(names) else str(y)
        counts[name] = counts.get(name, 0) + 1
    return counts


def as_dataset(data) -> Dataset:
    """An ImageSet (images already in memory) or any Dataset of (image, label) pairs."""
    return _ImageSetDataset(data) if isinstance(data, ImageSet) else data


class _ImageSetDataset(Dataset):
    def __init__(self, data: ImageSet) -> None:
        self.data, self.classes = data, data.classes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data.images[i], int(self.data.labels[i])


def batches(data: ImageSet, batch_size: int, shuffle: bool, normalization: Callable[[torch.Tensor], torch.Tensor],
            generator: torch.Generator | None = None, order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Image batches normalised as the model expects (`data.preprocessing.model_normalization`) with labels, in `order`
    if given (a resumed epoch), else shuffled or in order."""
    if order is None:
        order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    for i in range(0, len(data), batch_size):
        idx = order[i : i + batch_size]
        yield normalization(data.images[idx]), data.labels[idx]


@dataclass
class ImageSet:
    """Images as float tensors (N, C, H, W) in [0, 1] with integer labels."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)


def split_indices(n: int, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of a fixed random split of `n` training images, the same for the in-memory and the
    streaming data paths, so that their results compare."""
    if not 1 <= val_size < n:
        raise DataError(f"--val-size {val_size} does not fit the {n} training images: it must leave images to "
                        f"train on; lower --val-size (e.g. {max(1, n // 10)})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]
