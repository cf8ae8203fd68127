"""Pass: splice a token scorer and a static-k pruning op in front of a block.

Matches: the residual stream node entering block `j` (from `find_blocks`).
Emits, right after that node:
  * attention taps on the preceding `scorer.history` blocks (`ops.class_attention_qk`, `ops.attention_probs`,
    `ops.attention_descriptor`, ... depending on `scorer.attention`), reading the blocks' q/k (fused SDPA) or their
    softmax output (explicit attention) - the fused attention itself is left untouched;
  * `call_module spot_scorer_<j>` (the scorer), giving scores (B, N);
  * `call_function ops.prune_tokens(stream, scores, num_special, keep, fuse)`, which every later user of the stream
    now reads;
then re-derives all downstream shapes with `TokenPropagation`.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .. import ops
from ..errors import StructureError
from .find_blocks import Block, ModelStructure
from .propagate_tokens import TokenPropagation

SPOT_TAG = "spot_compile"  # node.meta key marking inserted nodes (used by --dump)


def insert_pruning(
    gm: GraphModule, structure: ModelStructure, before_block: int, keep: int, scorer: torch.nn.Module,
    history_from: int = 0, fuse: bool = False,
) -> Node:
    """Prunes to `num_special + keep (+1 fused)` tokens in front of block `before_block`; returns the prune node.

    `history_from` is the first block whose attention the scorer may read (the previous prune point), because
    blocks before it ran on a different token set.
    """
    blocks = structure.blocks
    if not 1 <= before_block < len(blocks):
        raise StructureError(f"stage at block {before_block} is out of range: the model has blocks 0..{len(blocks) - 1}, stages must be 1..{len(blocks) - 1}")
    stream = blocks[before_block].input
    tokens_in = int(stream.meta["val"].shape[1])
    patch_tokens = tokens_in - structure.num_special
    if not 1 <= keep <= patch_tokens:
        raise StructureError(f"stage at block {before_block}: cannot keep {keep} of {patch_tokens} prunable tokens")
    name = f"spot_scorer_{before_block}"
    gm.add_submodule(name, scorer)
    tapped = blocks[max(history_from, before_block - scorer.history):before_block] if scorer.history else []
    graph = gm.graph
    anchor = stream.next
    new_nodes: list[Node] = []

    def emit(target, *args, op: str = "call_function") -> Node:
        with graph.inserting_before(anchor):
            node = graph.call_module(target, args) if op == "call_module" else graph.call_function(target, args)
        node.meta[SPOT_TAG] = f"stage@{before_block}"
        new_nodes.append(node)
        return node

    batch_node = emit(torch.ops.aten.sym_size.int, stream, 0)
    taps = [_tap(emit, b, scorer.attention, batch_node, structure) for b in tapped]
    scores = emit(name, stream, *taps, op="call_module")
    pruned = emit(ops.prune_tokens, stream, scores, structure.num_special, keep, fuse)
    stream.replace_all_uses_with(pruned, delete_user_cb=lambda user: user not in new_nodes)

    prop = TokenPropagation(gm, stream, {tokens_in: structure.num_special + keep + int(fuse)}, f"block {before_block}")
    prop.run()
    return pruned


def _tap(emit, block: Block, kind: str, batch: Node, structure: ModelStructure) -> Node:
    cls = structure.class_token
    if block.kind == "sdpa":
        if kind == "class":
            return emit(ops.class_attention_qk, block.query, block.key, block.scale, batch, cls)
        probs = emit(ops.attention_probs, block.query, block.key, block.scale)
    else:
        if kind == "class":
            return emit(ops.class_attention_probs, block.attention, batch, cls)
        probs = block.attention
    if kind == "received":
        return emit(ops.attention_received, probs, batch)
    if kind == "descriptor":
        return emit(ops.attention_descriptor, probs, batch, structure.num_special, cls)
    raise ValueError(f"unknown attention tap {kind!r}")
