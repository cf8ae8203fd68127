"""Policy "class-attention": keep the tokens the class token attends to most (EViT's criterion), training-free."""

from __future__ import annotations

from torch import nn

from ..scorers import ClassAttentionScorer
from .base import DropPolicy
from .registry import register


@register
class ClassAttentionPolicy(DropPolicy):
    name = "class-attention"
    summary = "drop the tokens the class token attends to least (EViT-like; training-free)"

    def scorer(self, stage: int) -> nn.Module:
        return ClassAttentionScorer(self.structure.has_class_token)
