"""The public verb: `sparsify(model, SparsifyConfig(...)) -> SparseViT`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.fx import GraphModule

from .capture import capture, example_input
from .config import SparsifyConfig, default_stages
from .errors import BudgetError, InputSizeError
from .flops import count_flops
from .passes.find_blocks import ModelStructure, find_blocks
from .plan import SparsityPlan, Stage, build_sparse, solve_keep
from .predictors import load_predictor_checkpoint
from .scorers import ClassAttentionScorer, RandomScorer


class SparseViT(nn.Module):
    """The rewritten model: a GraphModule that prunes tokens, plus the plan that produced it.

    It shares its weights with the model it was made from. `compile()` returns it under `torch.compile`.
    """

    def __init__(self, graph_module: GraphModule, plan: SparsityPlan, structure: ModelStructure, config: SparsifyConfig) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self.config = config
        self.structure = structure

    def forward(self, x: torch.Tensor):
        if tuple(x.shape[1:]) != self.plan.input_shape[1:]:
            raise InputSizeError(
                f"input of shape {tuple(x.shape)} does not match the {self.plan.input_shape[1:]} (C, H, W) this model "
                "was sparsified for; resize the input or sparsify again with that input size"
            )
        return self.graph_module(x)

    def compile(self, **options) -> Callable:
        """`torch.compile(fullgraph=True)` of the graph; batch size may vary (dynamic after the first change)."""
        return torch.compile(self.graph_module, fullgraph=True, **options)

    def export(self, batch: int = 2) -> torch.export.ExportedProgram:
        """`torch.export` of the sparse graph with a dynamic batch size: save it with `torch.export.save`, or
        compile it ahead of time with AOTInductor (docs/serving.md)."""
        example = torch.randn(batch, *self.plan.input_shape[1:])
        return torch.export.export(self.graph_module, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))

    @property
    def scorers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.graph_module.named_children() if n.startswith("spot_scorer_")}


def sparsify(model: nn.Module, config: SparsifyConfig | None = None, *, scorers: dict[int, nn.Module] | None = None) -> SparseViT:
    """Captures `model` with torch.export, finds its attention blocks and prunes tokens to meet `config.budget`.

    The model's own parameters are used, not copied. Raises a `SpotError` subclass, with a message that says what
    to change, for any input it cannot handle. `scorers` (stage -> module) overrides the policy's scorers; the
    calibration recipe uses it to evaluate predictors while it trains them.
    """
    config = config or SparsifyConfig()
    example = example_input(model, config.input_size)
    captured = capture(model, example)
    structure = find_blocks(captured)
    depth = len(structure.blocks)
    if scorers is not None:
        make_scorer, calibrated_stages = scorers.__getitem__, tuple(sorted(scorers))
    else:
        make_scorer, calibrated_stages = scorer_factory(config, model, structure)
    stages = config.stages or calibrated_stages or default_stages(depth)
    for s in stages:
        if not 1 <= s < depth:
            raise BudgetError(f"stage {s} is out of range: the model has {depth} blocks, so stages must be in 1..{depth - 1}")
    one = example[:1]
    dense_flops = count_flops(captured, one)
    patch_tokens = structure.tokens - structure.num_special

    if config.keep is None and config.budget >= 1.0:
        plan = SparsityPlan(config.policy, config.budget, [], dense_flops, dense_flops, tuple(example.shape))
        return SparseViT(captured, plan, structure, config)
    if config.keep is not None:
        if len(config.keep) != len(stages):
            raise BudgetError(f"keep has {len(config.keep)} counts but there are {len(stages)} stages {stages}; give one per stage")
        keep = config.keep
    else:
        def flops_of(k: tuple[int, ...]) -> int:
            gm, _ = build_sparse(captured, stages, k, make_scorer, config.fuse_pruned)
            return count_flops(gm, one)

        keep = solve_keep(flops_of, dense_flops, patch_tokens, len(stages), config.budget, config.fuse_pruned, config.tolerance)
    gm, sparse_structure = build_sparse(captured, stages, keep, make_scorer, config.fuse_pruned)
    plan_stages, tokens = [], structure.tokens
    for s, k in zip(stages, keep):
        out = structure.num_special + k + int(config.fuse_pruned)
        plan_stages.append(Stage(s, tokens, out, k))
        tokens = out
    plan = SparsityPlan(config.policy, config.budget, plan_stages, dense_flops, count_flops(gm, one), tuple(example.shape))
    return SparseViT(gm, plan, sparse_structure, config)


def scorer_factory(
    config: SparsifyConfig, model: nn.Module, structure: ModelStructure
) -> tuple[Callable[[int], nn.Module], tuple[int, ...] | None]:
    """The scorer for each stage, and the stages a calibrated checkpoint fixes (None for training-free policies)."""
    if config.policy == "class-attention":
        return (lambda stage: ClassAttentionScorer(structure.has_class_token)), None
    if config.policy == "random":
        return (lambda stage: RandomScorer()), None
    ckpt = load_predictor_checkpoint(config.predictors, model, structure)
    if config.stages is not None and tuple(config.stages) != ckpt.stages:
        raise BudgetError(f"the predictors were calibrated for stages {ckpt.stages}, not {tuple(config.stages)}; drop --stages or calibrate again")
    return (lambda stage: ckpt.predictors[stage]), ckpt.stages
