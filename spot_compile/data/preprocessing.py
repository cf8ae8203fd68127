"""How a model wants its input pixels normalised, read from the model itself.

A model declares it the way timm models do: a `pretrained_cfg` dict with `mean` and `std` per channel (every timm
model has one, pretrained or not; spot-compile's own ViT declares Fashion-MNIST's statistics, on which the shipped
models were trained). `--mean` / `--std` override it; a model that declares nothing (a Hugging Face model keeps its
statistics in its image processor, not on the model) must be given them: normalising with another data set's
statistics would be a silently wrong input, so it is refused before any slow work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from spot_compile.errors import DataError

IMAGENET_HINT = "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 for ImageNet-trained models"


@dataclass(frozen=True)
class Normalization:
    """Per-channel (x - mean) / std of images in [0, 1]; `source` says where the numbers came from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise DataError(f"mean and std need one value per channel (or one for all), got {len(self.mean)} and {len(self.std)}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise DataError(f"mean and std must be finite numbers, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise DataError(f"std values must be positive, got {self.std}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._tensors
        return (x - mean.to(x)) / std.to(x)  # .to is free where dtype and device already match

    @cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # made once: building them on every call cost more than the rest of a per-image transform (46 us an image)
        return torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]

    def check_channels(self, channels: int) -> None:
        if len(self.mean) not in (1, channels):
            raise DataError(f"mean/std give {len(self.mean)} channels but the images have {channels}; give {channels} "
                            "values (or one for all)")

    def describe(self) -> str:
        values = ", ".join(f"{m:.4g}/{s:.4g}" for m, s in zip(self.mean, self.std))
        return f"input normalisation mean/std {values} ({self.source})"


def parse_values(text: str | None, option: str) -> tuple[float, ...] | None:
    """'0.5' or '0.485,0.456,0.406' -> floats; a one-line error naming the option for anything else."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"{option} must be comma-separated numbers, e.g. {option} 0.485,0.456,0.406; got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise DataError(f"{option} must be finite numbers, got {text!r}")
    return values


def model_normalization(model: torch.nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Normalization:
    """The normalisation `model` declares (timm's `pretrained_cfg`), or `mean`/`std` where given (both or neither)."""
    if (mean is None) != (std is None):
        raise DataError("give --mean and --std together (one value per channel, or one for all)")
    if mean is not None:
        return Normalization(tuple(float(v) for v in mean), tuple(float(v) for v in std), "--mean/--std")
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
        return Normalization(tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),
                             "declared by the model's pretrained_cfg")
    raise DataError(f"the model declares no input normalisation (timm's pretrained_cfg mean/std); pass the statistics it "
                    f"was trained with: {IMAGENET_HINT}")


# How training images are augmented; a model may declare its own in `pretrained_cfg["train_augment"]`.
AUGMENTATIONS = {
    "random-resized-crop": "RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip, as DeiT and timm train",
    "shift-flip": "shift by up to 2 pixels (zero padding) + horizontal flip, as spot-compile's Fashion-MNIST recipes train",
    "none": "no augmentation: the evaluation transform",
}
DEFAULT_AUGMENT = "random-resized-crop"  # for a model that declares none: the natural-image ViT recipes' choice


@dataclass(frozen=True)
class Preprocessing:
    """Everything between an image file and the model's input: normalisation, input size, evaluation resize and centre
    crop (resize the shorter side to size / crop_pct, crop the centre), interpolation, and the training augmentation."""

    normalization: Normalization
    input_size: tuple[int, int]
    channels: int
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    augment: str = DEFAULT_AUGMENT

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise DataError(f"unknown augmentation {self.augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if self.interpolation not in ("nearest", "bilinear", "bicubic"):
            raise DataError(f"unknown interpolation {self.interpolation!r}; choose nearest, bilinear or bicubic")
        if not 0 < self.crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        self.normalization.check_channels(self.channels)

    def describe(self) -> str:
        h, w = self.input_size
        return (f"{self.normalization.describe()}; input {self.channels}x{h}x{w}, eval crop_pct {self.crop_pct:g} "
                f"({self.interpolation}); train augmentation {self.augment}")


def model_preprocessing(model: torch.nn.Module, channels: int, input_size: tuple[int, int], *, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None, augment: str | None = None) -> Preprocessing:
    """The preprocessing `model` declares in timm's `pretrained_cfg` (mean, std, crop_pct, interpolation, and
    spot-compile's `train_augment`), with `mean`/`std`/`augment` overriding; `channels` and `input_size` are the
    model's input as captured (a user's --input-size wins over the declaration there)."""
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    pre = Preprocessing(model_normalization(model, mean, std), tuple(input_size), channels,
                        crop_pct=float(cfg.get("crop_pct") or 1.0), interpolation=str(cfg.get("interpolation") or "bilinear"),
                        augment=str(cfg.get("train_augment") or DEFAULT_AUGMENT))
    return replace(pre, augment=augment) if augment else pre
