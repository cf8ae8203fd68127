"""The pass contract and the one driver every graph rewrite of spot-compile goes through.

A pass is a `torch.fx.passes.infra.pass_base.PassBase`: constructed with what it needs to know (the model's
`ModelStructure`, a stage's block and token count, a scorer), called on a GraphModule, returning a `PassResult`
(the module and whether it changed). `run_passes` runs a list of them in order, then removes dead nodes, lints and
recompiles once. `capture` (the mask clean-up), `sparsify` (a policy's pass per stage, `plan.build_sparse`) and
calibration (`soft_pruning.build_calibration_graph`) all build their graphs with it; `SparseViT.export` exports
what it made.

torch's own `PassManager` is not used as the driver: it re-raises any error inside a pass as a bare `Exception`
naming the pass, which would turn a user's one-line `StructureError` into a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["FunctionPass", "PassBase", "PassResult", "StagePass", "run_passes"]


class FunctionPass(PassBase):
    """A pass from a function `fn(gm) -> anything` that rewrites `gm` in place (a stage's insertion)."""

    def __init__(self, fn: Callable[[GraphModule], object], name: str) -> None:
        self.fn, self.name = fn, name

    def call(self, graph_module: GraphModule) -> PassResult:
        changed = self.fn(graph_module)
        return PassResult(graph_module, changed is not None)

    def __repr__(self) -> str:
        return f"FunctionPass({self.name})"


class StagePass(FunctionPass):
    """A token reduction in front of block `before_block` (`fn(gm)` rewrites in place); `requires` refuses a block the
    model does not have or the first one, once for every policy's pass."""

    def __init__(self, fn: Callable[[GraphModule], object], structure, before_block: int, name: str, first: int = 1) -> None:
        super().__init__(fn, name)
        self.structure, self.before_block, self.first = structure, before_block, first

    def requires(self, graph_module: GraphModule) -> None:
        self.structure.check_stage(self.before_block, first=self.first)


def run_passes(gm: GraphModule, passes: Sequence[PassBase], *, keep_calls: bool = True) -> PassResult:
    """Runs `passes` on `gm` in order; then erases dead nodes (calls into inserted modules stay: a scorer may keep
    state, such as calibration's keep ratios), lints and recompiles the result."""
    modified = False
    for p in passes:
        result = p(gm)
        if result is not None:
            gm, modified = result.graph_module, modified or result.modified
    if modified:
        impure = ("call_module", "placeholder", "output") if keep_calls else ("placeholder", "output")
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in impure or n.is_impure())
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
