"""Policy "random": keep uniformly random tokens; the baseline every learned policy must beat."""

from __future__ import annotations

from torch import nn

from spot_compile.policies.base import DropPolicy
from spot_compile.policies.registry import register
from spot_compile.policy_configs import RandomConfig
from spot_compile.scorers.training_free import RandomScorer


@register
class RandomPolicy(DropPolicy):
    name = "random"
    config_type = RandomConfig
    deterministic = False
    summary = "drop uniformly random tokens (a baseline)"

    def scorer(self, stage: int) -> nn.Module:
        return RandomScorer()
