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
    # Start from the class token's attention (EViT's criterion, read from the interaction descriptor) and learn a
    # correction to it: relevance = scale·log(CLS-out) + MLP, the MLP's output layer zero at the start. Off by default:
    # on the cluttered benchmark it gained nothing over starting from noise (docs/research/why_not_beat_class_attention.md).
    anchor: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.signals) - set(SIGNALS)
        if unknown or not self.signals:
            raise ValueError(f"signals must be a non-empty subset of {SIGNALS}, got {self.signals}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be a positive width, got {self.hidden}")
        if not 0 <= self.coverage < float("inf"):
            raise ValueError(f"coverage must be a weight >= 0, and finite; got {self.coverage}")
        if self.anchor and "interaction" not in self.signals:
            raise ValueError("anchor reads the class token's attention from the interaction signal: keep 'interaction' "
                             "among the signals, or turn anchor off")
