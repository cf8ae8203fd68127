"""From a data directory to images: an IDX directory or an ImageFolder tree, checked once (`data_directory`), as
training and validation Datasets (`training_datasets`, streamed by calibration), as held-out images in memory
(`evaluation_images`, for `apply --data`), or as an IDX split decoded into memory (`load_dataset`, for the recipes
and benchmarks). Every path reads IDX files through `idx.IdxImages` and image files through `images`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spot_compile.data.fashion_mnist import FASHION_MNIST_DIR
from spot_compile.data.idx import IdxImages, find_idx
from spot_compile.data.images import image_folder, to_tensor
from spot_compile.data.imageset import ImageSet, classes_of, split
from spot_compile.data.preprocessing import Preprocessing
from spot_compile.data.transforms import EvalTransform
from spot_compile.errors import DataError


def data_directory(root: str | Path) -> Path:
    """`root` as a Path, when it is a directory; a one-line DataError otherwise (naming the Debian package for the
    default Fashion-MNIST directory)."""
    root = Path(root)
    if not root.is_dir():
        hint = " (install it with: apt-get install dataset-fashion-mnist)" if root == FASHION_MNIST_DIR else ""
        raise DataError(f"data directory not found: {root}{hint}")
    return root


def training_datasets(root: str | Path, val_size: int, seed: int = 0, channels: int = 1) -> tuple[Dataset, Dataset]:
    """(train, validation) from `root`: an ImageFolder tree with `train/` and `val/` (both used as they are), one
    ImageFolder tree, or an IDX directory (both split by `val_size` with a fixed `seed`; IDX test files are never read)."""
    root = data_directory(root)
    if find_idx(root, "train", "images"):
        return split(IdxImages(root, "train"), val_size, seed)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = image_folder(root / "train", channels), image_folder(root / "val", channels)
        if train.classes != val.classes:
            only_train, only_val = sorted(set(train.classes) - set(val.classes)), sorted(set(val.classes) - set(train.classes))
            raise DataError(f"{root}/train and {root}/val have different class folders (only in train/: "
                            f"{', '.join(only_train) or 'none'}; only in val/: {', '.join(only_val) or 'none'}); give both the same classes")
        return train, val
    if any(p.is_dir() for p in root.iterdir()):
        return split(image_folder(root / "train" if (root / "train").is_dir() else root, channels), val_size, seed)
    raise DataError(f"{root} is neither an IDX directory (train-images-idx3-ubyte.gz ...) nor an ImageFolder tree (CLASS/img.png)")


def evaluation_images(root: str | Path, pre: Preprocessing, limit: int | None = None) -> ImageSet:
    """The held-out images of `root` (an IDX test split, an ImageFolder `val/` or `test/`, or the tree itself), a
    fixed random subset of `limit`, resized and centre-cropped as `pre` says but not normalised, in memory."""
    root = data_directory(root)
    if find_idx(root, "test", "images"):
        data = IdxImages(root, "test")
    else:
        held_out = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
        if held_out is None and not any(p.is_dir() for p in root.iterdir()):
            raise DataError(f"{root} is neither an IDX directory (t10k-images-idx3-ubyte.gz ...) nor an ImageFolder tree "
                            "(val/CLASS/img.png)")
        data = image_folder(held_out or root, pre.channels)
    chosen = range(len(data))
    if limit is not None and limit < len(data):
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit].sort().values.tolist()
    crop = EvalTransform(pre)
    images, labels = [], []
    for i in chosen:
        image, label = data[i]
        images.append(crop.resize_crop(to_tensor(image, pre.channels, f"image {i} of {root}")))
        labels.append(int(label))
    return ImageSet(torch.stack(images), torch.tensor(labels), classes_of(data) or ())


def load_dataset(root: str | Path, split: str, img_size: int = 28, channels: int = 1, limit: int | None = None) -> ImageSet:
    """`split` ("train" or "test") of an IDX directory decoded into memory, resized to `img_size` if need be; with
    `limit`, a fixed random subset of that many images. (An ImageFolder tree is streamed instead: `training_datasets`,
    `evaluation_images`.)"""
    root = data_directory(root)
    if not (find_idx(root, "train", "images") or find_idx(root, "test", "images")):
        if any(p.is_dir() for p in root.iterdir()):
            raise DataError(f"{root} is an ImageFolder tree; this reads IDX directories into memory: read a tree with "
                            "spot_compile.data.datasets (training_datasets, evaluation_images)")
        raise DataError(f"{root} is neither an IDX directory (train-images-idx3-ubyte.gz ...) nor an ImageFolder tree (CLASS/img.png)")
    idx = IdxImages(root, split)
    images, labels = np.asarray(idx.images), idx.labels
    if limit is not None and limit < len(idx):
        chosen = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        images, labels = images[chosen.numpy()], labels[chosen]
    data = ImageSet(torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1), labels, idx.classes)
    if data.images.shape[1] != channels:
        raise DataError(f"{root} has {data.images.shape[1]}-channel images but the model takes {channels}")
    if data.images.shape[-1] != img_size:
        data.images = torch.nn.functional.interpolate(data.images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return data
