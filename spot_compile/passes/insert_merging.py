"""Pass: ToMe's token merging (Bolya et al., ICLR 2023) in front of a block, for policy "merge".

Matches the residual stream entering block j (j >= 1, from `graph.blocks`) and emits, right after
it:
  * `key_metric`: the keys of block j-1 (its SDPA's k, or the key operand of its explicit score matmul), averaged
    over heads: the similarity features (the stream itself where the scores come from an einsum);
  * `merge_tokens`: bipartite soft matching on the patch tokens (alternate tokens form sets A and B; each A token
    finds its most similar B token by cosine similarity; the r = tokens - keep best-matched A tokens are averaged
    into their partners, weighted by how many patches each token already stands for). Special tokens (class,
    distillation, registers) are never merged. Gives (tokens (B, S + keep, D), sizes (B, S + keep, 1));
  * proportional attention: `size_bias`, the log of each key's size, as an additive SDPA mask or added to the
    logits of an explicit softmax, in block j and every later block, so a token that
    stands for n patches is attended to as n of them would be. A later merge stage rewires these to its sizes;
then re-derives downstream shapes with `TokenPropagation`. Token counts are static: each stage merges a fixed r.
One stage merges at most half the patch tokens (every A token once), so the schedule never shrinks more than that.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from spot_compile.errors import StructureError
from spot_compile.graph.blocks import Block, ModelStructure, query_key
from spot_compile.ops.merging import key_metric, merge_tokens, size_bias
from spot_compile.passes.emit import SPOT_TAG, Emitter
from spot_compile.passes.propagate_tokens import TokenPropagation

SIZES_TAG = "spot_merge_sizes"  # node.meta key: the token sizes a merge stage produced (value: its block)
BIAS_TAG = "spot_size_bias"  # node.meta key: a node adding log sizes to a block's attention (value: the block)
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def insert_merging(gm: GraphModule, structure: ModelStructure, before_block: int, keep: int) -> Node | None:
    """Merges to `num_special + keep` tokens in front of block `before_block`; returns the merged stream node."""
    blocks = structure.blocks
    stream = blocks[before_block].input
    tokens_in = int(stream.meta["val"].shape[1])
    patch_tokens = tokens_in - structure.num_special
    if keep == patch_tokens:
        return None
    if not patch_tokens // 2 <= keep < patch_tokens:
        raise StructureError(f"stage at block {before_block}: merging can keep {patch_tokens // 2}..{patch_tokens} of "
                             f"{patch_tokens} tokens (one merge per token of one half), not {keep}")
    emit = Emitter(gm, stream.next, f"merge@{before_block}")
    batch = emit(torch.ops.aten.sym_size.int, stream, 0)
    qk = query_key(blocks[before_block - 1])
    metric = stream if qk is None else emit(key_metric, qk[1], batch, qk[2])
    merged = emit(merge_tokens, stream, latest_sizes(gm), metric, structure.num_special, keep)
    tokens = emit(operator.getitem, merged, 0)
    sizes = emit(operator.getitem, merged, 1)
    sizes.meta[SIZES_TAG] = before_block
    stream.replace_all_uses_with(tokens, delete_user_cb=lambda user: user not in emit.nodes and user.op != "output")
    rewire_size_bias(gm, structure, before_block, sizes)
    TokenPropagation(gm, stream, {tokens_in: structure.num_special + keep}, f"block {before_block}").run()
    return tokens


def latest_sizes(gm: GraphModule) -> Node | None:
    """The token sizes of the latest merge (or of a selection that carried them), None before any merge."""
    carried = [n for n in gm.graph.nodes if SIZES_TAG in n.meta]
    return max(carried, key=lambda n: n.meta[SIZES_TAG]) if carried else None


def rewire_size_bias(gm: GraphModule, structure: ModelStructure, from_block: int, sizes: Node) -> None:
    """Proportional attention by `sizes` in block `from_block` and every later block."""
    for block in structure.blocks[from_block:]:
        _proportional_attention(gm, block, sizes)


def _proportional_attention(gm: GraphModule, block: Block, sizes: Node) -> None:
    """Makes `block`'s attention read the log of `sizes` as a bias on its keys (rewiring an earlier stage's bias)."""
    existing = block.taps.get(BIAS_TAG)
    if existing is not None:
        existing.replace_input_with(existing.args[0], sizes)
        return
    core, graph = block.attention, gm.graph
    if block.kind == "sdpa":
        if core.target is not _SDPA:
            raise StructureError(f"block {block.index}'s attention is `{core.target}`, which takes no additive mask: "
                                 "merging cannot weight it by token size; use --policy class-attention")
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        if mask is not None or core.kwargs.get("is_causal") or (len(core.args) > 5 and core.args[5]):
            raise StructureError(f"block {block.index}'s attention already has a mask: merging does not combine "
                                 "masks yet; use --policy class-attention")
        with graph.inserting_before(core):
            bias = graph.call_function(size_bias, (sizes, core.args[0]))
        if len(core.args) > 3:
            core.args = (*core.args[:3], bias, *core.args[4:])
        else:
            core.kwargs = {**core.kwargs, "attn_mask": bias}
    else:  # an element-wise add, so the logits still lead to the score matmul through element-wise ops alone
        with graph.inserting_before(core):
            bias = graph.call_function(size_bias, (sizes, core.args[0]))
            biased = graph.call_function(torch.ops.aten.add.Tensor, (core.args[0], bias))
        core.args = (biased, *core.args[1:])
        biased.meta[SPOT_TAG] = f"merge@{sizes.meta[SIZES_TAG]}"
    bias.meta[BIAS_TAG] = block.index
    bias.meta[SPOT_TAG] = f"merge@{sizes.meta[SIZES_TAG]}"
    block.taps[BIAS_TAG] = bias
