"""Scorers that need no training: class attention (EViT's criterion) and uniformly random tokens (the baseline).
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
