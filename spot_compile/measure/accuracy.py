"""Top-1 on labelled images: a model's class logits found in its output, its accuracy, and dense vs sparse top-1
with their agreement (what sparsifying costs on a user's own images).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from spot_compile.data.imageset import ImageSet, batches
from spot_compile.data.preprocessing import Normalization, model_normalization
from spot_compile.errors import DataError, StructureError


@dataclass
class Comparison:
    images: int
    dense_top1: float
    sparse_top1: float
    agreement: float  # % of images where the sparse model's top-1 class is the dense model's

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def compare(model: torch.nn.Module, sparse: torch.nn.Module, data: ImageSet, normalization: Normalization,
            batch_size: int = 250) -> Comparison:
    """Dense and sparse top-1 on `data`, and their top-1 agreement, from one pass over it."""
    dense_ok = sparse_ok = same = 0
    for x, y in batches(data, batch_size, shuffle=False, normalization=normalization):
        dense, pruned = logits_of(model(x)), logits_of(sparse(x))
        if dense.shape[-1] <= int(y.max()):
            raise DataError(f"the data has labels up to {int(y.max())} but the model's head gives {dense.shape[-1]} "
                            "logits; evaluate on data with the model's classes, in its order")
        d, s = dense.argmax(-1), pruned.argmax(-1)
        dense_ok += int((d == y).sum())
        sparse_ok += int((s == y).sum())
        same += int((d == s).sum())
    n = len(data)
    return Comparison(n, 100.0 * dense_ok / n, 100.0 * sparse_ok / n, 100.0 * same / n)


def logits_of(output) -> torch.Tensor:
    """The class logits in a model's output: the tensor itself, a ModelOutput's `.logits` (Hugging Face), or the first
    entry of a tuple, list or dict (models that also return features or auxiliary heads)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict) and output:
        logits = output["logits"] if "logits" in output else next(iter(output.values()))
    elif logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise StructureError(f"cannot find class logits in the model's output (a {type(output).__name__}); return the "
                             "logits, a ModelOutput with .logits, or a tuple/dict with the logits first")
    return logits


@torch.no_grad()
def top1_correct(model: Callable[[torch.Tensor], object], batches: Iterable, device: torch.device | None = None) -> torch.Tensor:
    """How many images of the labelled `batches` `model` classifies right, as a 0-d int64 tensor (on `device`, where
    the batches are moved to; a sum over processes can then be one all-reduce)."""
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches:
        if device is not None:
            x, y = x.to(device), y.to(device)
        correct += (logits_of(model(x)).argmax(-1) == y).sum()
    return correct


def accuracy(model: Callable[[torch.Tensor], torch.Tensor], data: ImageSet, batch_size: int = 500,
             normalization: Normalization | None = None) -> float:
    """Top-1 % of `model` on `data`, normalised as `normalization` says, by default as the model declares."""
    normalization = normalization or model_normalization(model)
    return 100.0 * int(top1_correct(model, batches(data, batch_size, shuffle=False, normalization=normalization))) / len(data)
