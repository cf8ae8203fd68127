"""How a model wants its input pixels normalised, read from the model itself.

A model declares it the way timm models do: a `pretrained_cfg` dict with `mean` and `std` per channel (every timm
model has one, pretrained or not; spot-compile's own ViT declares Fashion-MNIST's statistics, on which the shipped
models were trained). `--mean` / `--std` override it; a model that declares nothing (a Hugging Face model keeps its
statistics in its image processor, not on the model) must be given them: normalising with another data set's
statistics would be a silently wrong input, so it is refused before any slow work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import DataError

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
        if any(s <= 0 for s in self.std):
            raise DataError(f"std values must be positive, got {self.std}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std

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
