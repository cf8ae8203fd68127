"""Build a sparsified graph for given keep counts: a copy of the captured graph, one policy pass per stage.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import GraphModule

from spot_compile.graph.blocks import ModelStructure, find_blocks
from spot_compile.graph.capture import clone_graph_module
from spot_compile.passes.pipeline import PassBase, run_passes


def build_sparse(
    captured: GraphModule, stages: tuple[int, ...], keep: tuple[int, ...], stage_pass: Callable[[ModelStructure, int, int], PassBase],
) -> tuple[GraphModule, ModelStructure]:
    """Clones `captured` and reduces to `keep[i]` patch tokens in front of block `stages[i]`: one pass per stage,
    `stage_pass(structure, block, keep)` (a token policy's, `TokenPolicy.stage_pass`), run by `passes.pipeline`."""
    gm = clone_graph_module(captured)
    structure = find_blocks(gm)
    gm = run_passes(gm, [stage_pass(structure, stage, k) for stage, k in zip(stages, keep)]).graph_module
    return gm, structure
