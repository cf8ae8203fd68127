"""Whether a selection finds the object, on the cluttered benchmark whose canvases record each garment's box: the
share of kept patch tokens whose centre lies in the box, against the share a random selection would get."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spot_compile.errors import DataError


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
