"""Policy "spot": SPOT's learned predictors, read from a calibrated checkpoint (`spot-compile calibrate`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from spot_compile.errors import BudgetError
from spot_compile.graph.blocks import ModelStructure
from spot_compile.graph.inputs import device_of, dtype_of
from spot_compile.policies.base import DropPolicy
from spot_compile.policies.registry import register
from spot_compile.policy_configs import SpotConfig
from spot_compile.serialization.predictors import load_predictor_checkpoint, with_tuned_backbone


@register
class SpotPolicy(DropPolicy):
    name = "spot"
    summary = "drop by SPOT's calibrated predictors (needs --predictors from `spot-compile calibrate`)"
    config_type = SpotConfig

    def __init__(self, config: Any, model: nn.Module, structure: ModelStructure) -> None:
        super().__init__(config, model, structure)
        self.checkpoint = load_predictor_checkpoint(self.settings.predictors, model, structure)
        for p in self.checkpoint.predictors.values():
            p.to(device=device_of(model), dtype=dtype_of(model))
        if config.stages is not None and tuple(config.stages) != self.checkpoint.stages:
            raise BudgetError(f"the predictors were calibrated for stages {self.checkpoint.stages}, not "
                              f"{tuple(config.stages)}; drop --stages or calibrate again")

    @classmethod
    def prepare_model(cls, config: Any, model: nn.Module) -> nn.Module:
        predictors = config.policy_config.predictors
        return model if predictors is None else with_tuned_backbone(model, predictors)

    @property
    def fixed_stages(self) -> tuple[int, ...]:
        return self.checkpoint.stages

    def scorer(self, stage: int) -> nn.Module:
        return self.checkpoint.predictors[stage]
