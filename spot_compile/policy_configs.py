"""Each token policy's own settings: one frozen dataclass per policy, registered under the policy's name.

`SparsifyConfig(policy=SpotConfig(predictors="p.pt"))` picks a policy together with its settings;
`SparsifyConfig(policy="spot", predictors="p.pt")` spells the same flat. These classes import nothing of the package
but `errors`, so making, comparing or reading a config runs no pass and loads no weights: the policy itself (in
`policies/`) does that when `sparsify` runs. A plug-in policy declares its config class beside it
(`TokenPolicy.config_type`); `policies.register` records both under one name.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from os import PathLike
from typing import Any, ClassVar

from spot_compile.errors import BudgetError

_CONFIGS: dict[str, type[PolicyConfig]] = {}


@dataclass(frozen=True)
class PolicyConfig:
    """The settings of one policy. Class attributes:
      name: the policy's registry name (`--policy`);
      version: the version of these settings a saved model stores (bump it when a field changes meaning);
      by_name: whether the policy can be chosen by its name alone (False where its settings are Python objects);
      storable: whether a model made with it can be saved (its settings are plain values)."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    by_name: ClassVar[bool] = True
    storable: ClassVar[bool] = True

    def settings(self) -> dict[str, Any]:
        """The fields as a plain dict (not deep-copied: a field may hold modules)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DropConfig(PolicyConfig):
    """Settings every policy that drops tokens shares.

    fuse: average the dropped tokens into one extra token (EViT-style) instead of discarding them. Keyword-only,
        so that a policy's own first setting is its first positional one (`SpotConfig("p.pt")`)."""

    fuse: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.fuse, bool):
            raise BudgetError(f"fuse must be True or False, got {self.fuse!r}")


def register_config(cls: type[PolicyConfig]) -> type[PolicyConfig]:
    """Class decorator: makes `cls` the settings of policy `cls.name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name`: the policy it configures")
    if cls.name in _CONFIGS and _CONFIGS[cls.name] is not cls:
        raise ValueError(f"settings for a token policy named {cls.name!r} are registered already ({_CONFIGS[cls.name].__name__})")
    _CONFIGS[cls.name] = cls
    return cls


def config_type(name: str) -> type[PolicyConfig]:
    return _CONFIGS[name]


def config_type_named(name: Any) -> type[PolicyConfig] | None:
    """The settings class of the policy called `name`, selectable by name; None if there is none. A name not seen
    yet loads the policies package first: a plug-in's settings are registered when its entry point is loaded."""
    if isinstance(name, str) and name not in _CONFIGS:
        importlib.import_module("spot_compile.policies")
    cls = _CONFIGS.get(name) if isinstance(name, str) else None
    return cls if cls is not None and cls.by_name else None


def unknown_policy(name: Any) -> str:
    """The line refusing `name` as a policy name."""
    if isinstance(name, str) and name in _CONFIGS:
        return f"policy {name!r} takes Python objects as settings: pass policy={_CONFIGS[name].__name__}(...)"
    return f"unknown policy {name!r}; choose one of {', '.join(config_names())}"


def config_names() -> tuple[str, ...]:
    """The policies that can be chosen by name."""
    return tuple(n for n, c in _CONFIGS.items() if c.by_name)


@register_config
@dataclass(frozen=True)
class MergeConfig(PolicyConfig):
    """Policy "merge": ToMe's token merging.

    merge_at: where each stage merges. "block" (the default): in front of block j, on block j-1's keys, over the
        patch tokens. "attention": ToMe as published (`tome/patch/timm.py`): inside block j, between its attention
        and its MLP, on block j's keys, over all tokens with the class (and distillation) token protected; its
        default stages are every block, the first included."""

    name = "merge"
    merge_at: str = "block"

    def __post_init__(self) -> None:
        if self.merge_at not in MERGE_AT:
            raise BudgetError(f"merge_at must be one of {', '.join(MERGE_AT)}, got {self.merge_at!r}")


MERGE_AT = ("block", "attention")


@register_config
@dataclass(frozen=True)
class ClassAttentionConfig(DropConfig):
    """Policy "class-attention": drop the tokens the class token attends to least."""

    name = "class-attention"


@register_config
@dataclass(frozen=True)
class RandomConfig(DropConfig):
    """Policy "random": drop uniformly random tokens."""

    name = "random"


@register_config
@dataclass(frozen=True)
class SpotConfig(DropConfig):
    """Policy "spot": SPOT's calibrated predictors.

    predictors: the predictor file `spot-compile calibrate` wrote."""

    name = "spot"
    predictors: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.predictors, PathLike):
            object.__setattr__(self, "predictors", str(self.predictors))
        if self.predictors is not None and not isinstance(self.predictors, str):
            raise BudgetError(f"predictors must be a file path, got a {type(self.predictors).__name__}")


@register_config
@dataclass(frozen=True)
class GivenScorersConfig(DropConfig):
    """Drop with scorer modules of the caller's own, one per stage (what calibration evaluates its predictors with).

    scorers: stage (a block index) -> scorer module (the contract is in `spot_compile.scorers`); the stages are
    its keys."""

    name = "given-scorers"
    by_name = False
    storable = False
    scorers: Mapping[int, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.scorers, Mapping) or not self.scorers:
            raise BudgetError("GivenScorersConfig needs scorers: a dict of block index -> scorer module, e.g. {3: scorer}")
        for stage, scorer in self.scorers.items():
            if isinstance(stage, bool) or not isinstance(stage, int) or not callable(scorer):
                raise BudgetError(f"scorers maps block indices to scorer modules; got {stage!r} -> {type(scorer).__name__}")

