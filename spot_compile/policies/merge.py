"""Policy "merge": ToMe's token merging (Bolya et al., ICLR 2023), training-free: its schedule (a constant number of
merges per block) and its pass (`passes.insert_merging`, on the maths of `ops.merging`).
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from spot_compile.graph.blocks import ModelStructure
from spot_compile.passes.insert_merging import insert_merging
from spot_compile.passes.merge_in_block import merge_in_block, special_tokens_as_tome
from spot_compile.policies.base import TokenPolicy
from spot_compile.policies.registry import register
from spot_compile.policy_configs import MergeConfig


@register
class MergePolicy(TokenPolicy):
    name = "merge"
    config_type = MergeConfig
    summary = ("merge the most similar tokens (ToMe: bipartite matching on keys, size-weighted averages, proportional "
               "attention; training-free)")
    reduction = "merge"
    stages_text = "every block after the first"

    in_block = False  # merge_at="attention": set from the config when the policy is made

    def __init__(self, config, model, structure) -> None:
        super().__init__(config, model, structure)
        self.in_block = self.settings.merge_at == "attention"
        if self.in_block:
            special_tokens_as_tome(structure)  # refused before the first build, in one line

    def default_stages(self, depth: int) -> tuple[int, ...]:
        """Every block after the first, as ToMe merges in every block: many small merges lose less than few large.
        Merging inside blocks (ToMe's placement), the first block too."""
        return tuple(range(self.first_stage, depth))

    @property
    def first_stage(self) -> int:
        return 0 if self.in_block else 1

    def schedule(self, patch_tokens: int, num_stages: int, rho: float) -> tuple[int, ...]:
        """ToMe's constant schedule for rho in [0.5, 1]: each stage merges the same r = (2 - 2 rho) * patch_tokens /
        num_stages tokens, never more than half of what enters it. Below 0.5, where the constant r can remove no
        more, it slides towards halving at every stage (a decreasing schedule, as in ToMe's schedule ablation), so
        that low budgets are reachable: at 0 each stage merges half of what enters it."""
        # ToMe's matching merges at most floor(n / 2) of n patch tokens; the default placement at most ceil(n / 2)
        least = (lambda n: n - n // 2) if self.in_block else (lambda n: n // 2)
        constant = _constant_schedule(patch_tokens, num_stages, max(0.0, 2.0 * rho - 1.0), least)
        if rho >= 0.5:
            return constant
        w = 2.0 * rho  # 1: the constant schedule at its limit; 0: halving
        halving = [max(1, patch_tokens // 2**s) for s in range(1, num_stages + 1)]
        return _at_most_halving(patch_tokens, [h + w * (c - h) for h, c in zip(halving, constant)], least)

    def reduce(self, gm: GraphModule, structure: ModelStructure, before_block: int, keep: int) -> Node | None:
        if self.in_block:
            return merge_in_block(gm, structure, before_block, keep)
        return insert_merging(gm, structure, before_block, keep)


def _constant_schedule(patch_tokens: int, num_stages: int, rho: float, least) -> tuple[int, ...]:
    r = (1.0 - rho) * patch_tokens / max(1, num_stages)
    return _at_most_halving(patch_tokens, [patch_tokens - s * r for s in range(1, num_stages + 1)], least)


def _at_most_halving(patch_tokens: int, targets: list[float], least) -> tuple[int, ...]:
    """Each stage's count rounded from its target, kept between `least(n)` of the n entering the stage (about half)
    and all of them."""
    keep, prev = [], patch_tokens
    for t in targets:
        prev = min(prev, max(least(prev), 1, round(t)))
        keep.append(prev)
    return tuple(keep)
