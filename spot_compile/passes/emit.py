"""Inserting nodes into a graph the way every pass does: in order before an anchor, tagged as spot-compile's (so
`--dump` can mark them) and given shape metadata.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from spot_compile.passes.propagate_tokens import fake_execute

SPOT_TAG = "spot_compile"  # node.meta key marking inserted nodes (used by --dump)


class Emitter:
    """Inserts nodes in order before `anchor`, tags them for --dump and gives them shape metadata."""

    def __init__(self, gm: GraphModule, anchor: Node, tag: str) -> None:
        self.gm, self.anchor, self.tag, self.nodes = gm, anchor, tag, []

    def __call__(self, target, *args, op: str = "call_function", before: Node | None = None, **kwargs) -> Node:
        graph = self.gm.graph
        with graph.inserting_before(before or self.anchor):
            node = graph.call_module(target, args, kwargs) if op == "call_module" else graph.call_function(target, args, kwargs)
        node.meta[SPOT_TAG] = self.tag
        if before is None:  # nodes at the anchor get their shapes from the propagation that follows
            self.nodes.append(node)
        else:
            node.meta["val"] = fake_execute(self.gm, node)
        return node
