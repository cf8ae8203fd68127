"""Image files: one image as a float (C, H, W) tensor in [0, 1] with the channels a model takes (`to_tensor`), and an
ImageFolder tree read file by file (`image_folder`), a file that cannot be read stopping the run with a line naming
it rather than being skipped (a skipped image would shorten the batch, and a changed batch shape recompiles).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from spot_compile.errors import DataError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
NEEDS_TORCHVISION = "needs torchvision (pip install torchvision, the release paired with your torch)"


def optional_torchvision():
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision


def to_tensor(image, channels: int, where: str = "an image") -> torch.Tensor:
    """A PIL image or a (C, H, W) / (H, W) tensor or array in [0, 1] (uint8: 0-255) as a float (channels, H, W) tensor."""
    if not isinstance(image, (torch.Tensor, np.ndarray)) and hasattr(image, "convert"):  # PIL
        image = _pil_pixels(image, channels, where)
    if not isinstance(image, torch.Tensor):
        pixels = np.asarray(image)
        # PIL's and a file buffer's arrays are read-only; torch warns about those on every image
        image = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
    t = image
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


def _pil_pixels(image, channels: int, where: str):
    """A PIL image's pixels in [0, 1] by the range of its mode (uint8 for the 8-bit modes, palette ones included,
    through PIL's conversion; 16-bit and float greyscale scaled by their own range), or a one-line refusal."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit greyscale (PIL opens some 16-bit PNGs as 32-bit "I")
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise DataError(f"{where} is a 32-bit integer image with values outside 0-65535; save it as an 8- or 16-bit image")
        return torch.from_numpy(pixels / 65535.0).float()
    if mode == "F":  # 32-bit float greyscale: already [0, 1], or refused
        pixels = np.asarray(image, dtype=np.float32)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise DataError(f"{where} is a floating-point image with values outside [0, 1] (from {float(np.nanmin(pixels)):g} "
                            f"to {float(np.nanmax(pixels)):g}); save it as an 8- or 16-bit image, or scale it to [0, 1]")
        return torch.from_numpy(pixels.copy())
    if channels == 1 and in_colour(image):
        raise DataError(f"{where} is a colour image but the model takes 1 channel; convert the data to greyscale or use "
                        "a model with 3 input channels")
    return np.asarray(image.convert("L" if channels == 1 else "RGB"))


def image_folder(base: Path, channels: int):
    """torchvision's ImageFolder over `base/CLASS/*`; an unreadable file stops the run naming it."""
    _refuse_directory_loops(base)
    tv = optional_torchvision()
    if tv is None:
        raise DataError(f"reading an image folder {NEEDS_TORCHVISION}")
    try:
        folder = tv.datasets.ImageFolder(str(base), loader=ImageLoader(channels), is_valid_file=_is_image)
    except FileNotFoundError as e:  # no class folders, or class folders with no images
        raise DataError(f"{base}: {first_line(e)}; expected ImageFolder layout {base}/CLASS/image.png") from None
    return folder


def _refuse_directory_loops(base: Path) -> None:
    """ImageFolder follows links into directories: one back into the tree would count its images again and again."""
    seen = {}
    for top, _, _ in os.walk(base, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            raise DataError(f"{top} is {seen[real]} again (a link to a directory the tree already holds): its images would "
                            "be counted twice; remove the link")
        seen[real] = top
        if len(seen) > 1_000_000:
            break


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


def in_colour(img) -> bool:
    """Whether a PIL image has colour: an RGB file whose channels all agree is grey in all but its format."""
    if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return False
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())
