"""What sparsifying costs on the user's own labelled images: dense vs sparse top-1 and how often they agree."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .data import ImageSet
from .errors import DataError
from .preprocessing import Normalization
from .training import batches, logits_of


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
