"""What a model takes as input: its device and dtype, its declared image size, and a deterministic example batch of
that shape (shapes, dtype and device are all a capture or a compile needs from it).
"""

from __future__ import annotations

import itertools

import torch

from spot_compile.errors import InputSizeError


def device_of(module: torch.nn.Module) -> torch.device:
    """Where the module's weights live (CPU for a module without any): inputs are made there."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def dtype_of(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype of the module's weights (float32 for a module without any): inputs are made in it."""
    # Lazily: SparseViT.forward asks on every call, and the first parameter answers.
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def example_input(model: torch.nn.Module, input_size: int | tuple[int, int] | None, batch: int = 2) -> torch.Tensor:
    """A random image batch of the model's input size, on the model's device: `input_size` if given, else what the
    model declares.

    Reading `img_size` / `image_size` (timm, torchvision, HF configs, spot-compile's own ViT) is only a default;
    any model works when the user passes the size.
    """
    channels = _declared(model, ("in_chans", "num_channels", "in_channels")) or 3
    size = input_size or _declared(model, ("img_size", "image_size"))
    if size is None:
        raise InputSizeError("cannot tell the model's input size; pass it with --input-size N (SparsifyConfig.input_size)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return noise_images((batch, int(channels), int(h), int(w)), device_of(model), dtype_of(model))


def noise_images(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian images of `shape`, the same on every call, drawn from a private generator.

    An example input only fixes shapes, dtype and device. Drawing it from the global generator made sparsifying move
    the caller's random stream: a calibration that sparsified twice trained differently from one that sparsified once.
    """
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def _declared(model: torch.nn.Module, names: tuple[str, ...]):
    holders = [model, getattr(model, "config", None), getattr(model, "patch_embed", None)]
    holders += [getattr(m, "config", None) for m in model.children()]
    for holder in holders:
        for name in names:
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int) or (isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value)):
                return value
    return None
