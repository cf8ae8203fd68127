"""Pass: drop attention masks that mask nothing.

Matches an attention-mask operand that is computed from constants and the batch size alone (no parameter, no
buffer, no image data) and whose value lets every query see every key:
  * the `attn_mask` of a `scaled_dot_product_attention` that is all True (boolean) or all zero (additive);
  * an operand of an `add` that is all zero and does not change the other operand's shape or dtype (the additive
    mask of an explicit softmax(QK^T + mask) attention).
Emits the SDPA without its mask, or the add's other operand in place of the add, and erases the mask's now dead
producers.

Why: Hugging Face transformers (5.x) builds such a mask for every encoder, from `arange`/`ge`/`expand` with the
token count baked in as a constant. It carries no information, but it pins the token count, so no token could be
dropped after it. A mask that masks something, or that depends on the input or on a parameter, is left alone (and
pruning then refuses the block with a message naming the mask).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from spot_compile.graph.query import ADD_OPS, SDPA_OPS

aten = torch.ops.aten


class RemoveTrivialMasks(PassBase):
    """The pass behind the contract of `passes.pipeline` (`example`: an input the graph accepts)."""

    def __init__(self, example: torch.Tensor) -> None:
        self.example = example

    def call(self, graph_module: GraphModule) -> PassResult:
        before = len(graph_module.graph.nodes)
        remove_trivial_masks(graph_module, self.example)
        return PassResult(graph_module, len(graph_module.graph.nodes) != before)


def remove_trivial_masks(gm: GraphModule, example: torch.Tensor) -> GraphModule:
    """Rewrites `gm` in place (and returns it); `example` is an input the graph accepts."""
    sdpa_masks: list[tuple[Node, Node]] = []
    add_masks: list[tuple[Node, Node, Node]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA_OPS:
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            if isinstance(mask, Node) and _constant_of_batch(mask):
                sdpa_masks.append((node, mask))
        elif node.target in ADD_OPS and len(node.args) == 2 and all(isinstance(a, Node) for a in node.args):
            for mask, other in (node.args, node.args[::-1]):
                if _constant_of_batch(mask) and _same_tensor_type(node, other):
                    add_masks.append((node, mask, other))
                    break
    if not sdpa_masks and not add_masks:
        return gm
    values = _evaluate(gm, example, {m for _, m in sdpa_masks} | {m for _, m, _ in add_masks})
    dead: list[Node] = []
    for sdpa, mask in sdpa_masks:
        if _allows_all(values[mask]):
            if "attn_mask" in sdpa.kwargs:
                sdpa.update_kwarg("attn_mask", None)
            else:
                sdpa.update_arg(3, None)
            dead.append(mask)
    for add, mask, other in add_masks:
        value = values[mask]
        if value.dtype != torch.bool and not value.any():
            add.replace_all_uses_with(other)
            gm.graph.erase_node(add)
            dead.append(mask)
    _erase_dead_producers(gm, dead)
    gm.recompile()
    return gm


def _constant_of_batch(node: Node) -> bool:
    """True when `node` is computed by ops from constants and the input's sizes only (no data, no weights)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr", "call_module"):
            return False
        if n.op == "call_function" and n.target is aten.sym_size.int:
            continue  # the batch size: shape, not data
        stack.extend(n.all_input_nodes)
    return isinstance(node.meta.get("val"), torch.Tensor)


def _same_tensor_type(add: Node, other: Node) -> bool:
    out, src = add.meta.get("val"), other.meta.get("val")
    return isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) and out.shape == src.shape and out.dtype == src.dtype


def _allows_all(mask: torch.Tensor) -> bool:
    return bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any())


def _evaluate(gm: GraphModule, example: torch.Tensor, wanted: set[Node]) -> dict[Node, torch.Tensor]:
    values: dict[Node, torch.Tensor] = {}

    class Recorder(Interpreter):
        def run_node(self, n: Node):
            result = super().run_node(n)
            if n in wanted:
                values[n] = result
            return result

    with torch.no_grad():
        Recorder(gm).run(example)
    return values


def _erase_dead_producers(gm: GraphModule, roots: list[Node]) -> None:
    stack, erased = list(roots), set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op != "call_function":
            continue
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)
