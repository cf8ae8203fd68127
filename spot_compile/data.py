"""Image classification data in memory: IDX files (the MNIST family) decoded into one tensor, the split rule, and the
checks every data path shares (ImageFolder trees stream through `streaming`).

Nothing is downloaded: Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


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


def load_idx_split(root: Path, split: str) -> ImageSet:
    images_path, labels_path = find_idx(root, split, "images"), find_idx(root, split, "labels")
    if images_path is None or labels_path is None:
        raise DataError(f"no {split} IDX files in {root} (expected {_SPLIT_PREFIX[split]}-images-idx3-ubyte[.gz] and labels)")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"IDX files in {root} disagree: images {images.shape} vs labels {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    classes = FASHION_MNIST_CLASSES if int(y.max()) < 10 and root == FASHION_MNIST_DIR else tuple(str(i) for i in range(int(y.max()) + 1))
    return ImageSet(x, y, classes)


def in_colour(img) -> bool:
    """Whether a PIL image has colour: an RGB file whose channels all agree is grey in all but its format."""
    if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return False
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())


def load_dataset(root: str | Path, split: str, img_size: int = 28, channels: int = 1, limit: int | None = None) -> ImageSet:
    """Loads `split` ("train" or "test") of an IDX directory into memory, resized to `img_size` if need be; with
    `limit`, a fixed random subset of that many images. (ImageFolder trees are read by `streaming`: torchvision's
    ImageFolder, file by file.)"""
    root = Path(root)
    if not root.is_dir():
        hint = " (install it with: apt-get install dataset-fashion-mnist)" if root == FASHION_MNIST_DIR else ""
        raise DataError(f"data directory not found: {root}{hint}")
    if find_idx(root, "train", "images") or find_idx(root, "test", "images"):
        data = load_idx_split(root, split)
        if limit is not None and limit < len(data):
            data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit].sort().values)
    elif any(p.is_dir() for p in root.iterdir()):
        raise DataError(f"{root} is an ImageFolder tree; this reads IDX directories into memory: read a tree with "
                        "spot_compile.streaming (training_datasets, evaluation_images)")
    else:
        raise DataError(f"{root} is neither an IDX directory (train-images-idx3-ubyte.gz ...) nor an ImageFolder tree (CLASS/img.png)")
    if data.images.shape[1] != channels:
        raise DataError(f"{root} has {data.images.shape[1]}-channel images but the model takes {channels}")
    if data.images.shape[-1] != img_size:
        data.images = torch.nn.functional.interpolate(data.images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return data


def train_val_split(data: ImageSet, val_size: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A fixed split of the training set: hyperparameters are chosen on `val`, never on the test split."""
    train, val = split_indices(len(data), val_size, seed)
    return data.subset(train), data.subset(val)


def split_indices(n: int, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of a fixed random split of `n` training images, the same for the in-memory and the
    streaming data paths, so that their results compare."""
    if not 1 <= val_size < n:
        raise DataError(f"--val-size {val_size} does not fit the {n} training images: it must leave images to "
                        f"train on; lower --val-size (e.g. {max(1, n // 10)})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


# Fashion-MNIST's pixel statistics on its training split.
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
