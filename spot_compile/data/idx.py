"""IDX files (the MNIST family): the one reader of their bytes (`read_idx`), where a split's files lie (`find_idx`),
and a split as a Dataset of (uint8 image, label) pairs (`IdxImages`) that training streams from and
`datasets.load_dataset` decodes into memory.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spot_compile.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from spot_compile.errors import DataError


class IdxImages(Dataset):
    """One split of an IDX directory (the MNIST family) as (uint8 image, label) pairs; the file's bytes are the only
    copy (a memory map of an uncompressed file)."""

    def __init__(self, root: Path, split: str) -> None:
        images, labels = find_idx(root, split, "images"), find_idx(root, split, "labels")
        if images is None or labels is None:
            raise DataError(f"no {split} IDX files in {root} (expected {_SPLIT_PREFIX[split]}-images-idx3-ubyte[.gz] and labels)")
        self.images = _map_idx(images)
        if self.images.dtype != np.uint8:
            raise DataError(f"{images} holds {self.images.dtype} pixels; spot-compile reads 8-bit (ubyte) IDX images: "
                            "convert the file to unsigned bytes")
        labels = read_idx(labels)
        if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
            raise DataError(f"the labels of {root} hold {labels.min()!r} ({labels.dtype}); labels must be class indices "
                            "0, 1, 2, ...: fix the labels file")
        if self.images.ndim != 3 or labels.ndim != 1 or len(self.images) != len(labels):
            raise DataError(f"IDX files in {root} disagree: images {self.images.shape} vs labels {labels.shape}")
        self.labels = torch.from_numpy(labels.astype(np.int64))
        n = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.classes = FASHION_MNIST_CLASSES if n <= 10 and Path(root) == FASHION_MNIST_DIR else tuple(str(i) for i in range(n))
        self.where = str(images)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.images[i])), int(self.labels[i])


def _map_idx(path: Path) -> np.ndarray:
    if path.suffix == ".gz":  # compressed: decompressed once, held as uint8 (4x less than decoded floats)
        return read_idx(path)
    raw = read_idx(path)  # validates the header and size
    header = 4 + 4 * raw.ndim
    return np.memmap(path, dtype=raw.dtype, mode="r", offset=header, shape=raw.shape)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}; check the --data directory")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path} ({e}); the file is corrupt or truncated, reinstall the data") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); expected MNIST-style IDX data")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; reinstall the data")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path} holds {len(raw) - header} data bytes but its header promises {expected}; the file is corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_idx(root: Path, split: str, kind: str) -> Path | None:
    """The IDX file of `kind` ("images" or "labels") for `split` in `root` (gzip-compressed or not), or None."""
    prefix = _SPLIT_PREFIX[split]
    for name in (f"{prefix}-{kind}-idx{1 if kind == 'labels' else 3}-ubyte", f"{prefix}-{kind}.idx"):
        for suffix in (".gz", ""):
            if (root / (name + suffix)).is_file():
                return root / (name + suffix)
    return None
