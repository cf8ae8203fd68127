"""Small training utilities shared by the recipes, the benchmarks and the predictor calibration (whose data path and
augmentation are `streaming`'s)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from .data import ImageSet
from .errors import StructureError
from .preprocessing import Normalization, model_normalization


def batches(data: ImageSet, batch_size: int, shuffle: bool, normalization: Callable[[torch.Tensor], torch.Tensor],
            generator: torch.Generator | None = None, order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Image batches normalised as the model expects (`preprocessing.model_normalization`) with labels, in `order`
    if given (a resumed epoch), else shuffled or in order."""
    if order is None:
        order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    for i in range(0, len(data), batch_size):
        idx = order[i : i + batch_size]
        yield normalization(data.images[idx]), data.labels[idx]


def logits_of(output) -> torch.Tensor:
    """The class logits in a model's output: the tensor itself, a ModelOutput's `.logits` (Hugging Face), or the first
    entry of a tuple, list or dict (models that also return features or auxiliary heads)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict) and output:
        logits = next(iter(output.values()))
    elif logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise StructureError(f"cannot find class logits in the model's output (a {type(output).__name__}); return the "
                             "logits, a ModelOutput with .logits, or a tuple/dict with the logits first")
    return logits


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], data: ImageSet, batch_size: int = 500,
             normalization: Normalization | None = None) -> float:
    """Top-1 % of `model` on `data`, normalised as `normalization` says, by default as the model declares."""
    normalization = normalization or model_normalization(model)
    correct = 0
    for x, y in batches(data, batch_size, shuffle=False, normalization=normalization):
        correct += int((logits_of(model(x)).argmax(-1) == y).sum())
    return 100.0 * correct / len(data)
