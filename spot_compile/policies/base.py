"""The token-policy interface: what every way of reducing tokens (dropping, fusing, merging) declares and does.

A policy is one module that subclasses `TokenPolicy` and registers itself (`policies.register`). `sparsify`, the
config's validation, the CLI's choices and `--help`, and the saved artifact all read the registry, so adding a
policy touches no other file. A policy is made once per `sparsify` call, for one captured model, and then asked
to reduce tokens in front of each stage block of a fresh graph (`reduce`), once per candidate schedule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from torch import nn
from torch.fx import GraphModule, Node

from spot_compile.graph.blocks import ModelStructure
from spot_compile.passes.insert_pruning import insert_pruning
from spot_compile.passes.pipeline import PassBase, StagePass
from spot_compile.planning.budget import keep_schedule
from spot_compile.policy_configs import DropConfig, PolicyConfig


def default_stages(depth: int) -> tuple[int, ...]:
    """Blocks at 1/4, 1/2, 3/4 of the depth (3/6/9 of 12); at least block 1, never the first block."""
    return tuple(sorted({min(depth - 1, max(1, round(depth * f))) for f in (0.25, 0.5, 0.75)})) if depth > 1 else ()


class TokenPolicy(ABC):
    """One way of reducing tokens in front of chosen blocks, with static token counts.

    Class attributes (read by the registry, the CLI's `--help` and docs):
      name: the `SparsifyConfig.policy` / `--policy` value;
      summary: one line for `--help`;
      reduction: "drop" (tokens are discarded, or fused into one with `fuse`) or "merge" (tokens are
        averaged into their most similar partners: nothing is discarded);
      config_type: its settings, a frozen dataclass from `policy_configs` (or the plug-in's own); `register`
        derives one named after the policy where a subclass declares none;
      deterministic: whether two calls on one input choose the same tokens;
      stages_text: its default stages in words (for `--stages`' help).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    reduction: ClassVar[Literal["drop", "merge"]]
    config_type: ClassVar[type[PolicyConfig]] = PolicyConfig
    # False where the policy draws its choices afresh on every call (two runs of one input then differ)
    deterministic: ClassVar[bool] = True
    # `default_stages` in words, for `--stages`' help
    stages_text: ClassVar[str] = "the blocks at 1/4, 1/2 and 3/4 of the depth"

    def __init__(self, config: Any, model: nn.Module, structure: ModelStructure) -> None:
        """`config` is the `SparsifyConfig` (its `policy_config`, this policy's settings, is `self.settings`);
        `structure` the captured dense model's blocks."""
        self.config, self.structure = config, structure
        self.settings = config.policy_config

    @property
    def fuses(self) -> bool:
        """Whether dropped tokens are averaged into one extra token."""
        return bool(getattr(self.settings, "fuse", False))

    @classmethod
    def prepare_model(cls, config: Any, model: nn.Module) -> nn.Module:
        """The model to capture (a policy whose weights came with a tuned backbone returns a copy carrying it)."""
        return model

    @property
    def fixed_stages(self) -> tuple[int, ...] | None:
        """Stages the policy's weights were trained for (None: any stages)."""
        return None

    def default_stages(self, depth: int) -> tuple[int, ...]:
        return default_stages(depth)

    @property
    def first_stage(self) -> int:
        """The first block a stage may be at: 1 for a reduction in front of a block (the default), 0 for one inside
        a block, after its attention."""
        return 1

    def schedule(self, patch_tokens: int, num_stages: int, rho: float) -> tuple[int, ...]:
        """Patch tokens kept after each stage for a keep rate `rho` in [0, 1] (1: every token), never growing, and
        monotone in `rho` (the budget search bisects on it). By default DynamicViT's geometric schedule (rho**s)."""
        return keep_schedule(patch_tokens, num_stages, rho, self.fuses)

    def tokens_out(self, keep: int) -> int:
        """Tokens leaving a stage that keeps `keep` patch tokens (special tokens included)."""
        return self.structure.num_special + keep + int(self.fuses)

    @abstractmethod
    def reduce(self, gm: GraphModule, structure: ModelStructure, before_block: int, keep: int) -> Node | None:
        """Rewrites `gm` so that `keep` patch tokens (plus the special tokens) enter block `before_block`; returns the
        node that now carries the stream (None where nothing had to change)."""


    def stage_pass(self, structure: ModelStructure, before_block: int, keep: int) -> PassBase:
        """`reduce` at one stage, behind the pass contract of `passes.pipeline`."""
        return StagePass(lambda gm: self.reduce(gm, structure, before_block, keep), structure, before_block,
                         f"{self.name}@{before_block}", self.first_stage)


class DropPolicy(TokenPolicy):
    """Scores tokens with a module per stage and keeps the top `keep` (`passes.insert_pruning`)."""

    reduction = "drop"
    config_type = DropConfig

    @abstractmethod
    def scorer(self, stage: int) -> nn.Module:
        """The scoring module spliced in front of block `stage` (see `scorers` for its contract)."""

    def reduce(self, gm: GraphModule, structure: ModelStructure, before_block: int, keep: int) -> Node:
        return insert_pruning(gm, structure, before_block, keep, self.scorer(before_block), fuse=self.fuses,
                              scorer_prefix=self.scorer_prefix)

    @property
    def scorer_prefix(self) -> str:
        """The scorer submodules' name prefix in the graph (`--dump`, `SparseViT.scorers`): the policy's own name."""
        return self.name.replace("-", "_")

