"""Pass: splice a token scorer and a static-k pruning op in front of a block.

Matches: the residual stream node entering block `j` (from `graph.blocks`; `passes.pipeline.StagePass` refuses a j the
model does not have, or 0, before the pass runs).
Emits, right after that node (taps and positions through `passes.taps`, shared with calibration):
  * attention taps on the preceding `scorer.history` blocks (`ops.class_attention_qk`, `ops.attention_received`,
    `ops.interaction_descriptor`, ... depending on `scorer.attention`). Class attention and SPOT's descriptor read
    the block's q/k (O(N·d)), or its logits where the block already forms them. Taps that need the whole matrix
    (attention received, for models without a class token) materialise it once at that block: the block's fused SDPA becomes
    `attention_probs -> matmul` and the probabilities feed both the block and the tap, so attention is not paid
    twice. A tap on a block before an earlier prune point is carried through that prune's selection;
  * for a scorer with `positions` set, each surviving token's index in the patch grid: `ops.token_positions` of the
    first block's input, emitted once, and carried through the prunes made since the last stage that read it;
  * `call_module <policy>_scorer_<j>` (the scorer, with `positions=` if it asked for them), giving scores (B, N);
  * `call_function ops.kept_patch_indices(scores, num_special, keep)`, the top-k, once per stage;
  * `call_function ops.prune_tokens(stream, scores, num_special, keep, fuse, kept)`, which every later user of the
    stream now reads (a tap carried through this stage is gathered by the same `kept`);
then re-derives all downstream shapes with `TokenPropagation`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node

from spot_compile import ops
from spot_compile.errors import StructureError
from spot_compile.graph.blocks import ModelStructure
from spot_compile.passes.emit import Emitter
from spot_compile.passes.propagate_tokens import TokenPropagation
from spot_compile.passes.taps import attention_tap, follow, grid_positions


def insert_pruning(
    gm: GraphModule, structure: ModelStructure, before_block: int, keep: int, scorer: torch.nn.Module, fuse: bool = False,
    carry: Callable[[Callable[[Node], Node]], None] | None = None, scorer_prefix: str = "spot",
) -> Node:
    """Prunes to `num_special + keep (+1 fused)` tokens in front of block `before_block`; returns the prune node.
    The scorer becomes submodule `<scorer_prefix>_scorer_<block>` (a policy names it after itself).

    `carry`, if given, is called before downstream shapes are re-derived with a function that emits the same
    selection on another per-token tensor (B, N, ...) and returns the selected node: a policy that keeps other
    per-token values beside the stream (merging's token sizes) makes them follow the prune there."""
    blocks = structure.blocks
    stream = blocks[before_block].input
    tokens_in = int(stream.meta["val"].shape[1])
    patch_tokens = tokens_in - structure.num_special
    if not 1 <= keep <= patch_tokens:
        raise StructureError(f"stage at block {before_block}: cannot keep {keep} of {patch_tokens} prunable tokens")
    name = f"{scorer_prefix}_scorer_{before_block}"
    gm.add_submodule(name, scorer)
    earlier_prunes = [n for n in gm.graph.nodes if n.target is ops.prune_tokens and "spot_block" in n.meta]
    tapped = blocks[max(0, before_block - scorer.history):before_block]
    emitter = Emitter(gm, stream.next, f"stage@{before_block}")
    batch = emitter(torch.ops.aten.sym_size.int, stream, 0)
    selections = [p.args[1:] for p in earlier_prunes]
    taps = []
    for b in tapped:  # a tap saw the tokens alive at block b: it follows the selections made after b
        tap = attention_tap(gm, emitter, b, scorer.attention, batch, structure)
        taps.append(follow(emitter, tap, [p.args[1:] for p in earlier_prunes if b.index < p.meta["spot_block"]]))
    kwargs = {}
    if getattr(scorer, "positions", False):
        kwargs["positions"] = grid_positions(gm, emitter, structure, selections)
    scores = emitter(name, stream, *taps, op="call_module", **kwargs)
    kept = emitter(ops.kept_patch_indices, scores, structure.num_special, keep)
    pruned = emitter(ops.prune_tokens, stream, scores, structure.num_special, keep, fuse, kept)
    pruned.meta["spot_block"] = before_block
    # The model's own output of this very tensor (an early feature map) stays the dense one: it is computed in full.
    stream.replace_all_uses_with(pruned, delete_user_cb=lambda user: user not in emitter.nodes and user.op != "output")
    if carry is not None:
        carry(lambda node: emitter(ops.prune_tokens, node, *pruned.args[1:]))
    TokenPropagation(gm, stream, {tokens_in: structure.num_special + keep + int(fuse)}, f"block {before_block}").run()
    return pruned
