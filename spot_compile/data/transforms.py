"""The model's eval transform (timm's resize and centre crop, then normalisation) and its declared training
augmentation. Every random choice of the augmentation is a function of (seed, epoch, image index) alone: the same
image gets the same crop whatever the number of workers or processes, and a resumed epoch replays exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spot_compile.data.images import NEEDS_TORCHVISION, optional_torchvision, to_tensor
from spot_compile.data.preprocessing import Preprocessing
from spot_compile.errors import DataError


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
            if optional_torchvision() is None:
                raise DataError(f"the {pre.augment} augmentation {NEEDS_TORCHVISION}; or choose --augment shift-flip / none")
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
