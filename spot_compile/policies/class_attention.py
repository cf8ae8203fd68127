"""Policy "class-attention": keep the tokens the class token attends to most (EViT's criterion), training-free."""

from __future__ import annotations

from torch import nn

from spot_compile.policies.base import DropPolicy
from spot_compile.policies.registry import register
from spot_compile.policy_configs import ClassAttentionConfig
from spot_compile.scorers.training_free import ClassAttentionScorer


@register
class ClassAttentionPolicy(DropPolicy):
    name = "class-attention"
    config_type = ClassAttentionConfig
    summary = "drop the tokens the class token attends to least (EViT-like; training-free)"

    def scorer(self, stage: int) -> nn.Module:
        return ClassAttentionScorer(self.structure.has_class_token)
