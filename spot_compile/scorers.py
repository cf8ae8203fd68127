"""Token scorers: the modules that fill the pruning pass's scoring slot.

A scorer is an `nn.Module` with `forward(tokens, *attention) -> scores (B, N)` and two attributes the pass reads:
  * `attention`: what the pass must tap from the preceding blocks: "none", "class" (class-token attention row,
    cheap for fused attention), "received" (mean attention received; forms the matrix) or "descriptor"
    (`ops.interaction_descriptor` per layer, from q/k);
  * `history`: how many preceding blocks to tap (never across an earlier prune point);
  * `positions` (optional, default False): if set, the pass also passes `positions=` (B, N, 1), each token's index
    among the input's patch tokens (-1 for special tokens), so a scorer can use where a token sits in the image.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassAttentionScorer(nn.Module):
    """Training-free: a token matters as much as the class token attends to it (EViT's criterion).

    Without a class token, the mean attention a token receives stands in.
    """

    history = 1

    def __init__(self, has_class_token: bool) -> None:
        super().__init__()
        self.attention = "class" if has_class_token else "received"

    def forward(self, tokens: torch.Tensor, *attention: torch.Tensor) -> torch.Tensor:
        return attention[-1]


class RandomScorer(nn.Module):
    """Baseline policy: uniformly random tokens (special tokens are kept by the pruning op regardless)."""

    attention = "none"
    history = 0

    def forward(self, tokens: torch.Tensor, *attention: torch.Tensor) -> torch.Tensor:
        return torch.rand(tokens.shape[:2], device=tokens.device)
