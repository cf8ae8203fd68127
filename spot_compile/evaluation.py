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


@dataclass
class BoxPrecision:
    precision: float  # % of the kept patch tokens whose centre lies in the object's box
    box_share: float  # % of all patch tokens whose centre lies in it: what keeping tokens at random would score

    @property
    def lift(self) -> float:
        """How many times more often a kept token lies on the object than a token drawn at random."""
        return self.precision / self.box_share if self.box_share else float("nan")


def patches_in_box(boxes: torch.Tensor, patches: int, patch: int) -> torch.Tensor:
    """(B, patches) bool: the patch tokens (row-major on a square grid of `patch`-pixel patches) whose centre lies in
    each image's box, `boxes` (B, 4) as top, left, height, width in pixels."""
    side = int(round(patches ** 0.5))
    if side * side != patches:
        raise DataError(f"{patches} patch tokens are not a square grid")
    centre = torch.arange(side, dtype=torch.float32) * patch + patch / 2
    top, left, height, width = (boxes[:, i, None].float() for i in range(4))
    rows = (centre[None] >= top) & (centre[None] < top + height)  # (B, side)
    cols = (centre[None] >= left) & (centre[None] < left + width)
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)


def box_precision(kept: torch.Tensor, boxes: torch.Tensor, patch: int) -> BoxPrecision:
    """Whether a policy finds the object: `kept` (B, P) bool, the patch tokens alive after a stage (row-major on a
    square grid of `patch`-pixel patches, as `visualize.kept_patches` gives them); `boxes` (B, 4) the object's
    top, left, height, width in pixels. Pooled over the batch."""
    inside = patches_in_box(boxes, kept.shape[1], patch)
    kept = kept.bool()
    precision = 100.0 * float((kept & inside).sum()) / max(int(kept.sum()), 1)
    return BoxPrecision(precision, 100.0 * float(inside.float().mean()))
