"""What a stage reads from the blocks before it, emitted into the graph: attention taps, their carry through the
token selections made since, and the tokens' grid positions. Shared by inference (`insert_pruning`) and calibration
(`soft_pruning`), so that a predictor sees the same inputs in both graphs.

A selection is the argument tuple of an `ops.prune_tokens` call after its first argument, `(scores or mask,
num_special, keep, fuse, kept)`: following it gathers a tap's rows for the tokens that survived.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.fx import GraphModule, Node

from spot_compile import ops
from spot_compile.graph.blocks import Block, ModelStructure

Emit = Callable[..., Node]  # emit(target, *args, op="call_function", before=None, **kwargs) -> Node
Selection = tuple


def attention_tap(
    gm: GraphModule, emit: Emit, block: Block, kind: str, batch: Node, structure: ModelStructure,
    mask: Node | None = None, qk: tuple[Node, Node, float | None] | None = None,
) -> Node:
    """The tap of `kind` on `block`, emitted once per block and kind and reused when a later stage reads it:
      * "class": attention the class token pays each token (`ops.class_attention_qk` from q/k, or the explicit row);
      * "received": mean attention received (forms the matrix, `materialize_attention`);
      * "descriptor": SPOT's interaction descriptor (`ops.interaction_descriptor` from q/k, or from the explicit
        logits), restricted to the live tokens where the block attended under `mask` (calibration).
    `qk` (q, k, scale) stands in for the block's SDPA operands where a pass has replaced the SDPA (calibration)."""
    key = kind if mask is None else f"{kind}@masked"
    if key not in block.taps:
        block.taps[key] = _emit_tap(gm, emit, block, kind, batch, structure, mask, qk)
    return block.taps[key]


def _emit_tap(gm, emit: Emit, block: Block, kind: str, batch: Node, structure: ModelStructure, mask, qk) -> Node:
    cls = structure.class_token
    qk = qk or ((block.query, block.key, block.scale) if block.kind == "sdpa" else None)
    if kind == "class":
        if qk is not None:
            return emit(ops.class_attention_qk, *qk, batch, cls)
        return emit(ops.class_attention_probs, block.attention, batch, cls)
    if kind == "descriptor":
        if qk is not None:
            return emit(ops.interaction_descriptor, *qk, batch, structure.num_special, cls, mask)
        if block.attention.target is ops.attention_probs:  # materialised by another tap: q and k are at hand
            return emit(ops.interaction_descriptor, *block.attention.args, batch, structure.num_special, cls, mask)
        return emit(ops.descriptor_from_logits, block.attention.args[0], batch, structure.num_special, cls, mask)
    if kind == "received":
        return emit(ops.attention_received, materialize_attention(gm, block, emit), batch)
    raise ValueError(f"unknown attention tap {kind!r}")


def follow(emit: Emit, node: Node, selections: Sequence[Selection]) -> Node:
    """`node` (per-token rows of an earlier block) gathered through each selection in turn, aligned with the stream."""
    for selection in selections:
        node = emit(ops.prune_tokens, node, *selection)
    return node


POSITIONS_TAG = "spot_positions"  # node.meta key: token grid positions, valued by how many selections they followed


def grid_positions(gm: GraphModule, emit: Emit, structure: ModelStructure, selections: Sequence[Selection]) -> Node:
    """Where the tokens entering this stage sit in the patch grid: `ops.token_positions` of the first block's input,
    emitted once per graph; a later stage continues the carry an earlier one left through the selections made
    since (`selections`: every selection so far, in order). The carry is found by its tag in the graph, not kept on
    `ModelStructure`: positions are no part of the model."""
    carried = [n for n in gm.graph.nodes if POSITIONS_TAG in n.meta]
    if carried:
        pos = max(carried, key=lambda n: n.meta[POSITIONS_TAG])
    else:
        pos = emit(ops.token_positions, structure.blocks[0].input, structure.num_special)
        pos.meta[POSITIONS_TAG] = 0
    pos = follow(emit, pos, selections[pos.meta[POSITIONS_TAG]:])
    pos.meta[POSITIONS_TAG] = len(selections)
    return pos


def materialize_attention(gm: GraphModule, block: Block, emit: Emit) -> Node:
    """Replaces a plain fused SDPA by softmax(q kᵀ·scale) @ v and returns the probabilities node (cached)."""
    if block.kind == "explicit":
        return block.attention
    if block.probs is not None:
        return block.probs
    sdpa = block.attention
    q, k, v = sdpa.args[:3]
    extra = [a for a in sdpa.args[3:] if a not in (None, 0.0, False)]
    extra += [kw for kw, a in sdpa.kwargs.items() if kw != "scale" and a not in (None, 0.0, False)]
    if extra:  # masked, causal or dropout attention: keep it fused and form the matrix beside it
        probs = emit(ops.attention_probs, q, k, block.scale)
    else:
        probs = emit(ops.attention_probs, q, k, block.scale, before=sdpa)
        out = emit(torch.ops.aten.matmul.default, probs, v, before=sdpa)
        sdpa.replace_all_uses_with(out)
        gm.graph.erase_node(sdpa)
        block.attention, block.kind = probs, "explicit"
    block.probs = probs
    return probs
