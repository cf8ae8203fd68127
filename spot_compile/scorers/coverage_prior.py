"""A fixed spatial coverage prior over the patch grid: the farthest-point order, from the centre out.

On the shipped model a fixed, spatially uniform thinning beats every relevance rule measured, attention oracles
included (docs/research/selection_rules.md): the backbone reads an item's silhouette from the background around it,
so covering the image matters more than picking the most attended tokens. The prior lets SPOT's predictors start
from that coverage and move away from it where their relevance logits are confident.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.cache
def farthest_point_rank(patch_tokens: int) -> torch.Tensor:
    """(patch_tokens,) long: each patch position's rank in the farthest-point order of the grid.

    The order starts at the centre; each next position is the one farthest (Euclidean) from all taken so far, ties
    going to the lowest raster index, so any prefix of the order is a near-uniform thinning of the grid. A square
    token count is read as a square grid; any other count as a line of tokens.
    """
    side = math.isqrt(patch_tokens)
    if side * side == patch_tokens:
        grid = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        pts = torch.stack(grid, -1).reshape(-1, 2).float()
        first = side * (side // 2) + side // 2
    else:
        pts = torch.stack([torch.arange(patch_tokens), torch.zeros(patch_tokens, dtype=torch.long)], -1).float()
        first = patch_tokens // 2
    order = [first]
    dist = ((pts - pts[first]) ** 2).sum(-1)
    for _ in range(patch_tokens - 1):
        order.append(int(dist.argmax()))
        dist = torch.minimum(dist, ((pts - pts[order[-1]]) ** 2).sum(-1))
    rank = torch.empty(patch_tokens, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(patch_tokens)
    return rank


def coverage_prior(patch_tokens: int) -> torch.Tensor:
    """(patch_tokens,) float in [0, 1]: 1 for the first position of the farthest-point order, falling linearly to 0
    for the last, so the top-k of the prior is the order's first k positions for every k."""
    rank = farthest_point_rank(patch_tokens).float()
    return 1 - rank / max(patch_tokens - 1, 1)
