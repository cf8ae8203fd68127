"""Policy "given-scorers": drop with scorer modules the caller passes in `GivenScorersConfig` (calibration evaluates
the predictors it is training this way)."""

from __future__ import annotations

from typing import Any

from torch import nn

from spot_compile.graph.blocks import ModelStructure
from spot_compile.policies.base import DropPolicy
from spot_compile.policies.registry import register
from spot_compile.policy_configs import GivenScorersConfig


@register
class GivenScorers(DropPolicy):
    """Drop with scorers the caller supplies per stage (`GivenScorersConfig`; calibration evaluates its predictors
    this way). Registered, but not selectable by name: its settings are modules."""

    name = "given-scorers"
    summary = "scorer modules of the caller's own, one per stage (GivenScorersConfig)"
    config_type = GivenScorersConfig

    def __init__(self, config: Any, model: nn.Module, structure: ModelStructure) -> None:
        super().__init__(config, model, structure)
        self.scorers = dict(self.settings.scorers)

    scorer_prefix = "given"

    @property
    def fixed_stages(self) -> tuple[int, ...]:
        return tuple(sorted(self.scorers))

    def scorer(self, stage: int) -> nn.Module:
        return self.scorers[stage]

