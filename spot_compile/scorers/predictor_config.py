"""The settings of SPOT's predictors (`scorers.spot`): which signals they read and how wide they are. Plain data,
importing nothing of the package, so that a calibration config can hold one without loading a model or a pass."""

from __future__ import annotations

from dataclasses import dataclass

SIGNALS = ("embedding", "interaction", "dynamics")


@dataclass(frozen=True)
class PredictorConfig:
    hidden: int = 32
    signals: tuple[str, ...] = SIGNALS
    # Weight of the fixed spatial coverage prior added to every relevance logit (`coverage.coverage_prior`, in [0, 1]):
    # 0 is SPOT as published; a large weight is a fixed uniform thinning of the grid that the logits only reorder
    # where they differ by more than the prior does.
    coverage: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.signals) - set(SIGNALS)
        if unknown or not self.signals:
            raise ValueError(f"signals must be a non-empty subset of {SIGNALS}, got {self.signals}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be a positive width, got {self.hidden}")
        if not 0 <= self.coverage < float("inf"):
            raise ValueError(f"coverage must be a weight >= 0, and finite; got {self.coverage}")
