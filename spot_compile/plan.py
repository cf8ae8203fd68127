"""Build a sparsified graph for given keep counts, and choose keep counts that meet a FLOPs budget."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.fx import Graph, GraphModule

from .errors import BudgetError
from .passes.find_blocks import ModelStructure, find_blocks
from .passes.insert_pruning import insert_pruning


@dataclass
class Stage:
    block: int  # pruning happens in front of this block
    tokens_in: int
    tokens_out: int  # including special tokens (and the fused token)
    keep: int  # patch tokens kept (the static k of the prune op)


@dataclass
class SparsityPlan:
    policy: str
    budget: float
    stages: list[Stage]
    dense_flops: int
    sparse_flops: int
    input_shape: tuple[int, ...]

    @property
    def flops_ratio(self) -> float:
        return self.sparse_flops / self.dense_flops

    def to_dict(self) -> dict:
        return {**asdict(self), "flops_ratio": self.flops_ratio}


def clone_graph_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of the graph (node meta kept), sharing gm's parameters and submodules."""
    graph = Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = GraphModule(gm, graph)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    return new


def build_sparse(
    captured: GraphModule, stages: tuple[int, ...], keep: tuple[int, ...], make_scorer: Callable[[int], torch.nn.Module],
    fuse: bool = False,
) -> tuple[GraphModule, ModelStructure]:
    """Clones `captured` and prunes to `keep[i]` patch tokens in front of block `stages[i]`."""
    gm = clone_graph_module(captured)
    structure = find_blocks(gm)
    for stage, k in zip(stages, keep):
        insert_pruning(gm, structure, stage, k, make_scorer(stage), fuse=fuse)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("call_module", "placeholder", "output") or n.is_impure())
    gm.graph.lint()
    gm.recompile()
    return gm, structure


def keep_schedule(patch_tokens: int, num_stages: int, rho: float, fuse: bool) -> tuple[int, ...]:
    """DynamicViT's schedule: stage s keeps rho**s of the patch tokens; counts never grow between stages."""
    keep, prev = [], patch_tokens
    for s in range(1, num_stages + 1):
        k = max(1, min(prev, round(patch_tokens * rho**s)))
        keep.append(k)
        prev = k + int(fuse)
    return tuple(keep)


def solve_keep(
    flops_of: Callable[[tuple[int, ...]], int], dense_flops: int, patch_tokens: int, num_stages: int, budget: float,
    fuse: bool, tolerance: float,
) -> tuple[int, ...]:
    """The largest rho whose schedule costs at most `budget` of the dense FLOPs.

    Every candidate is built and counted with the real counter, which is the slow part (symbolic shape
    propagation), so the search interpolates inside a bracket (regula falsi) instead of halving it, and stops as
    soon as a schedule lands in [budget - tolerance/4, budget].
    """
    cache: dict[tuple[int, ...], float] = {}

    def ratio(rho: float) -> tuple[float, tuple[int, ...]]:
        keep = keep_schedule(patch_tokens, num_stages, rho, fuse)
        if keep not in cache:
            cache[keep] = flops_of(keep) / dense_flops
        return cache[keep], keep

    lo_r, best = ratio(0.0)
    if lo_r > budget:
        raise BudgetError(
            f"budget {budget} is unreachable with these stages: keeping one token per stage still costs "
            f"{lo_r:.3f} of dense; raise the budget or prune earlier (--stages)"
        )
    lo, hi, hi_r = 0.0, 1.0, ratio(1.0)[0]
    for _ in range(20):
        if budget - lo_r <= tolerance / 4 or hi - lo < 1e-4:
            break
        t = (budget - lo_r) / (hi_r - lo_r) if hi_r > lo_r else 0.5
        mid = lo + min(max(t, 0.05), 0.95) * (hi - lo)
        r, keep = ratio(mid)
        if r <= budget:
            lo, lo_r, best = mid, r, keep
        else:
            hi, hi_r = mid, r
    return best
