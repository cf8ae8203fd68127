"""Images streamed from disk for training: torch Datasets over IDX files and ImageFolder trees, the model's train and
eval transforms, and the sampler and DataLoader that feed calibration on one process or many.

Nothing here holds decoded images: an ImageFolder tree is read file by file in the loader's workers, an IDX file is
held as its raw bytes (uint8, a memory map where it is not compressed), so resident memory does not grow with the
number of images (benchmarks/calibration_scaling.py measures it).

Every random choice of the training augmentation is a function of (seed, epoch, image index) alone: the same image
gets the same crop whatever the number of workers or processes, and a resumed epoch replays exactly.

A file that cannot be read stops the run with a line naming it (`DataError`), rather than being skipped: a skipped
image would shorten the batch, and a changed batch shape recompiles the static-shape graph; with `--save-every` the
run resumes where it stopped once the file is removed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, ImageSet, find_idx, in_colour, read_idx, split_indices
from .errors import DataError, SpotError, first_line
from .preprocessing import Preprocessing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_NEEDS_TORCHVISION = "needs torchvision (pip install torchvision, the release paired with your torch)"


def _torchvision():
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision


def to_tensor(image, channels: int, where: str = "an image") -> torch.Tensor:
    """A PIL image or a (C, H, W) / (H, W) tensor or array in [0, 1] (uint8: 0-255) as a float (channels, H, W) tensor."""
    if not isinstance(image, (torch.Tensor, np.ndarray)) and hasattr(image, "convert"):  # PIL
        if channels == 1 and in_colour(image):
            raise DataError(f"{where} is a colour image but the model takes 1 channel; convert the data to greyscale or use "
                            "a model with 3 input channels")
        image = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    t = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if t.dim() == 2:
        t = t.unsqueeze(0)
    elif t.dim() == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
        t = t.permute(2, 0, 1)  # HWC (PIL's and numpy's order)
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.shape[0] != channels:
        if t.shape[0] == 1:
            t = t.expand(channels, -1, -1)
        else:
            raise DataError(f"{where} has {t.shape[0]} channels but the model takes {channels}; convert the data or use "
                            f"a model with {t.shape[0]} input channels")
    return t


class EvalTransform:
    """Resize the shorter side to size / crop_pct, crop the centre, normalise: timm's eval transform. An image
    already of the input size with crop_pct 1 is only normalised."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre

    def resize_crop(self, t: torch.Tensor) -> torch.Tensor:
        h, w = self.pre.input_size
        if self.keeps_size(t.shape[-2:]):
            return t
        # timm's sizes: the shorter side to floor(size / crop_pct), the longer in proportion (truncated, as torchvision)
        side = math.floor(max(h, w) / self.pre.crop_pct)
        ih, iw = t.shape[-2:]
        size = (side, int(side * iw / ih)) if ih <= iw else (int(side * ih / iw), side)
        t = _resize(t, size, self.pre.interpolation)
        top, left = round((size[0] - h) / 2), round((size[1] - w) / 2)
        return t[:, top : top + h, left : left + w]

    def keeps_size(self, size) -> bool:
        return tuple(size) == tuple(self.pre.input_size) and self.pre.crop_pct == 1.0

    def __call__(self, image, where: str = "an image", seed: int | None = None) -> torch.Tensor:
        return self.pre.normalization(self.resize_crop(to_tensor(image, self.pre.channels, where)))

    def batch(self, images: list, seeds: list[int | None]) -> torch.Tensor | None:
        """What calling the transform on each image gives, stacked, from a few batch-wide ops; None (the caller goes
        image by image) unless the images are greyscale uint8 tensors of one shape needing no resize (IDX data)."""
        if not images or not all(isinstance(i, torch.Tensor) and i.dtype == torch.uint8 and i.dim() == 2 for i in images):
            return None
        if len({tuple(i.shape) for i in images}) != 1 or not self.keeps_size(images[0].shape):
            return None
        x = (torch.stack(images).unsqueeze(1).float() / 255.0).expand(-1, self.pre.channels, -1, -1)
        return self.pre.normalization(self.augment_batch(x, seeds))

    def augment_batch(self, x: torch.Tensor, seeds: list[int | None]) -> torch.Tensor:
        return x


class TrainTransform(EvalTransform):
    """The declared training augmentation, then normalisation; every random draw is a function of the image's `seed`
    (`Prepared` gives each image its own; without one, a seed is drawn from torch's global generator), so an image
    is augmented the same alone or in a batch (`batch`)."""

    SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults, as DeiT and timm train

    def __init__(self, pre: Preprocessing) -> None:
        super().__init__(pre)
        if pre.augment == "random-resized-crop":
            if _torchvision() is None:
                raise DataError(f"the {pre.augment} augmentation {_NEEDS_TORCHVISION}; or choose --augment shift-flip / none")
            from torchvision.transforms import v2

            self.mode = getattr(v2.InterpolationMode, pre.interpolation.upper())

    def __call__(self, image, where: str = "an image", seed: int | None = None) -> torch.Tensor:
        seed = _seed(seed)
        t = to_tensor(image, self.pre.channels, where)
        dy, dx, flip = draws(seed)
        if self.pre.augment == "random-resized-crop":
            from torchvision.transforms.v2 import functional as TF

            top, left, h, w = crop_box(t.shape[-2], t.shape[-1], self.SCALE, self.RATIO, torch.Generator().manual_seed(seed))
            t = TF.resized_crop(t, top, left, h, w, list(self.pre.input_size), interpolation=self.mode, antialias=True)
        else:
            t = self.resize_crop(t)
            if self.pre.augment == "shift-flip":
                t = shift(t, SHIFT, dy, dx)
        if self.pre.augment != "none" and flip:
            t = t.flip(-1)
        return self.pre.normalization(t)

    def batch(self, images: list, seeds: list[int | None]) -> torch.Tensor | None:
        return None if self.pre.augment == "random-resized-crop" else super().batch(images, seeds)

    def augment_batch(self, x: torch.Tensor, seeds: list[int | None]) -> torch.Tensor:
        if self.pre.augment == "none":
            return x
        dy, dx, flip = (torch.tensor(v) for v in zip(*(draws(_seed(s)) for s in seeds)))
        if self.pre.augment == "shift-flip":
            b, _, h, w = x.shape
            rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1): the padded rows each image reads
            cols = (dx[:, None] + torch.arange(w))[:, None, :]
            x = F.pad(x, (SHIFT,) * 4)[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


SHIFT = 2  # pixels each way of the shift-flip augmentation
_MASK = 2**64 - 1


def draws(seed: int) -> tuple[int, int, bool]:
    """The shift (dy, dx in 0..2*SHIFT) and the flip of one image, from its seed alone: splitmix64's finaliser in
    plain Python, 1 us an image (making and seeding a torch.Generator per image cost more than the augmentation)."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    span = 2 * SHIFT + 1
    return z % span, (z // span) % span, bool((z >> 32) & 1)


def _seed(seed: int | None) -> int:
    return int(torch.randint(0, 2**62, ())) if seed is None else seed


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width), drawn as torchvision draws it (ten tries at a random area
    and log-uniform aspect ratio, else the centre crop of the nearest allowed ratio), from `generator`."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def shift(t: torch.Tensor, pad: int, dy: int, dx: int) -> torch.Tensor:
    """`t` (C, H, W) translated to read from offset (dy, dx) of itself padded by `pad` (0..2*pad: pad is no shift),
    the uncovered border zero (black, before normalisation)."""
    h, w = t.shape[-2:]
    return F.pad(t, (pad, pad, pad, pad))[:, dy : dy + h, dx : dx + w]


def _resize(t: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
    return F.interpolate(t.unsqueeze(0), size=size, mode=mode, **kwargs).squeeze(0).clamp(0, 1)


class IdxImages(Dataset):
    """One split of an IDX directory (the MNIST family) as (uint8 image, label) pairs; the file's bytes are the only
    copy (a memory map of an uncompressed file)."""

    def __init__(self, root: Path, split: str) -> None:
        images, labels = find_idx(root, split, "images"), find_idx(root, split, "labels")
        if images is None or labels is None:
            raise DataError(f"no {split} IDX files in {root} (expected {split}-images-idx3-ubyte[.gz] and labels)")
        self.images = _map_idx(images)
        self.labels = torch.from_numpy(read_idx(labels).astype(np.int64))
        if self.images.ndim != 3 or len(self.images) != len(self.labels):
            raise DataError(f"IDX files in {root} disagree: images {self.images.shape} vs labels {tuple(self.labels.shape)}")
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


def image_folder(base: Path, channels: int):
    """torchvision's ImageFolder over `base/CLASS/*`; an unreadable file stops the run naming it."""
    tv = _torchvision()
    if tv is None:
        raise DataError(f"reading an image folder {_NEEDS_TORCHVISION}")
    try:
        folder = tv.datasets.ImageFolder(str(base), loader=ImageLoader(channels), is_valid_file=_is_image)
    except FileNotFoundError as e:  # no class folders, or class folders with no images
        raise DataError(f"{base}: {first_line(e)}; expected ImageFolder layout {base}/CLASS/image.png") from None
    return folder


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


class ImageLoader:
    """Opens one image file; a picklable callable, for the loader's workers."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, path: str):
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.load()
                image = img.copy()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {path} ({first_line(e)}); remove or replace the file") from None
        return to_tensor(image, self.channels, path)  # here, where the file's name is known for a refusal


def training_datasets(root: str | Path, val_size: int, seed: int = 0, channels: int = 1) -> tuple[Dataset, Dataset]:
    """(train, validation) from `root`: an ImageFolder tree with `train/` and `val/` (both used as they are), one
    ImageFolder tree, or an IDX directory (both split by `val_size` with a fixed `seed`; IDX test files are never read)."""
    root = Path(root)
    if not root.is_dir():
        hint = " (install it with: apt-get install dataset-fashion-mnist)" if root == FASHION_MNIST_DIR else ""
        raise DataError(f"data directory not found: {root}{hint}")
    if find_idx(root, "train", "images"):
        return split(IdxImages(root, "train"), val_size, seed)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = image_folder(root / "train", channels), image_folder(root / "val", channels)
        if train.classes != val.classes:
            raise DataError(f"{root}/train and {root}/val have different class folders ({len(train.classes)} vs "
                            f"{len(val.classes)}); give both the same classes")
        return train, val
    if any(p.is_dir() for p in root.iterdir()):
        return split(image_folder(root / "train" if (root / "train").is_dir() else root, channels), val_size, seed)
    raise DataError(f"{root} is neither an IDX directory (train-images-idx3-ubyte.gz ...) nor an ImageFolder tree (CLASS/img.png)")


def evaluation_images(root: str | Path, pre: Preprocessing, limit: int | None = None) -> ImageSet:
    """The held-out images of `root` (an IDX test split, an ImageFolder `val/` or `test/`, or the tree itself), a
    fixed random subset of `limit`, resized and centre-cropped as `pre` says but not normalised, in memory."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
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


def split(data: Dataset, val_size: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A fixed split of one training set (`data.split_indices`): hyperparameters are chosen on the validation part,
    never on a test split."""
    train, val = split_indices(len(data), val_size, seed)
    return Subset(data, train.tolist()), Subset(data, val.tolist())


def classes_of(data: Dataset) -> tuple[str, ...] | None:
    while isinstance(data, Subset):
        data = data.dataset
    classes = getattr(data, "classes", None)
    return tuple(classes) if classes is not None else None


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
