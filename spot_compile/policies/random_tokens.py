"""Policy "random": keep uniformly random tokens; the baseline every learned policy must beat."""

from __future__ import annotations

from torch import nn

from ..scorers import RandomScorer
from .base import DropPolicy
from .registry import register


@register
class RandomPolicy(DropPolicy):
    name = "random"
    summary = "drop uniformly random tokens (a baseline)"

    def scorer(self, stage: int) -> nn.Module:
        return RandomScorer()
