"""Policy "merge": ToMe's token merging (Bolya et al., ICLR 2023), training-free, as a graph pass.

Pass `insert_merging` matches the residual stream entering block j (j >= 1, from `find_blocks`) and emits, right after
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
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..errors import StructureError
from ..passes.find_blocks import Block, ModelStructure, query_key
from ..passes.insert_pruning import SPOT_TAG, Emitter
from ..passes.propagate_tokens import TokenPropagation
from .base import TokenPolicy
from .registry import register

SIZES_TAG = "spot_merge_sizes"  # node.meta key: the token sizes a merge stage produced (value: its block)
BIAS_TAG = "spot_size_bias"  # node.meta key: a node adding log sizes to a block's attention (value: the block)
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def key_metric(k: torch.Tensor, batch: int, transposed: bool) -> torch.Tensor:
    """(B, N, d): the keys averaged over heads, from (B, H, N, d), (B*H, N, d) or, `transposed`, (..., d, N)."""
    if transposed:
        k = k.transpose(-2, -1)
    n, d = k.shape[-2], k.shape[-1]
    return k.reshape(batch, -1, n, d).mean(1)


def merge_tokens(
    tokens: torch.Tensor, sizes: torch.Tensor | None, metric: torch.Tensor, num_special: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges the patch tokens of `tokens` (B, N, D) down to `keep` by bipartite soft matching on `metric` (B, N, C).

    `sizes` (B, N, 1): how many input patches each token stands for (None: one each). Returns the merged tokens,
    special tokens first, then the unmerged tokens of set A in their order, then set B; and their sizes.
    """
    b, n, d = tokens.shape
    s = num_special
    r = n - s - keep
    if sizes is None:
        sizes = tokens.new_ones(b, n, 1)
    m = F.normalize(metric[:, s:], dim=-1)
    similarity = m[:, ::2] @ m[:, 1::2].transpose(-2, -1)  # (B, |A|, |B|)
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=-1).values
    # The size rides along as one more channel, so tokens and sizes move through a single gather and scatter.
    x = torch.cat([tokens[:, s:] * sizes[:, s:], sizes[:, s:]], dim=-1)
    xa, xb = x[:, ::2], x[:, 1::2]
    xb = xb.scatter_add(1, partner.gather(1, merged_a)[..., None].expand(-1, -1, d + 1),
                        xa.gather(1, merged_a[..., None].expand(-1, -1, d + 1)))
    out = torch.cat([xa.gather(1, kept_a[..., None].expand(-1, -1, d + 1)), xb], dim=1)
    out_sizes = out[..., d:]
    return torch.cat([tokens[:, :s], out[..., :d] / out_sizes], dim=1), torch.cat([sizes[:, :s], out_sizes], dim=1)


def size_bias(sizes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """log(sizes) shaped to add to the attention logits of keys laid out as `like` (the queries or the logits):
    (B, 1, 1, N) for (B, H, N, .) and (B*H, 1, N) for (B*H, N, .), batch-major as nn.MultiheadAttention folds it."""
    bias = sizes.squeeze(-1).log().to(like.dtype)  # (B, N)
    if like.dim() == 4:
        return bias[:, None, None, :]
    return bias.repeat_interleave(like.shape[0] // sizes.shape[0], dim=0)[:, None, :]


def insert_merging(gm: GraphModule, structure: ModelStructure, before_block: int, keep: int) -> Node | None:
    """Merges to `num_special + keep` tokens in front of block `before_block`; returns the merged stream node."""
    blocks = structure.blocks
    if not 1 <= before_block < len(blocks):
        raise StructureError(f"stage at block {before_block} is out of range: the model has blocks 0..{len(blocks) - 1}, "
                             f"stages must be 1..{len(blocks) - 1}")
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


@register
class MergePolicy(TokenPolicy):
    name = "merge"
    summary = ("merge the most similar tokens (ToMe: bipartite matching on keys, size-weighted averages, proportional "
               "attention; training-free)")
    reduction = "merge"

    def default_stages(self, depth: int) -> tuple[int, ...]:
        """Every block after the first, as ToMe merges in every block: many small merges lose less than few large."""
        return tuple(range(1, depth))

    def schedule(self, patch_tokens: int, num_stages: int, rho: float) -> tuple[int, ...]:
        """ToMe's constant schedule for rho in [0.5, 1]: each stage merges the same r = (2 - 2 rho) * patch_tokens /
        num_stages tokens, never more than half of what enters it. Below 0.5, where the constant r can remove no
        more, it slides towards halving at every stage (a decreasing schedule, as in ToMe's schedule ablation), so
        that low budgets are reachable: at 0 each stage merges half of what enters it."""
        constant = _constant_schedule(patch_tokens, num_stages, max(0.0, 2.0 * rho - 1.0))
        if rho >= 0.5:
            return constant
        w = 2.0 * rho  # 1: the constant schedule at its limit; 0: halving
        halving = [max(1, patch_tokens // 2**s) for s in range(1, num_stages + 1)]
        return _at_most_halving(patch_tokens, [h + w * (c - h) for h, c in zip(halving, constant)])

    def reduce(self, gm: GraphModule, structure: ModelStructure, before_block: int, keep: int) -> Node | None:
        return insert_merging(gm, structure, before_block, keep)


def _constant_schedule(patch_tokens: int, num_stages: int, rho: float) -> tuple[int, ...]:
    r = (1.0 - rho) * patch_tokens / max(1, num_stages)
    return _at_most_halving(patch_tokens, [patch_tokens - s * r for s in range(1, num_stages + 1)])


def _at_most_halving(patch_tokens: int, targets: list[float]) -> tuple[int, ...]:
    """Each stage's count rounded from its target, kept between half of what enters the stage and all of it."""
    keep, prev = [], patch_tokens
    for t in targets:
        prev = min(prev, max(prev // 2, 1, round(t)))
        keep.append(prev)
    return tuple(keep)
