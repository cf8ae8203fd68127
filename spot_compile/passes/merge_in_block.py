"""Pass: ToMe's token merging placed as the published code places it (`tome/patch/timm.py`), for policy "merge" with
`merge_at="attention"`.

Matches block j's attention residual (the stream after `x + attn(x)`, from `graph.blocks`) and emits, right after it:
  * `key_metric`: the keys of block j's own attention, averaged over heads;
  * `tome_merge`: ToMe's bipartite soft matching over all tokens, the class token's similarities (and a
    distillation token's) set to -inf so that they are never merged, size-weighted averages
    (`ops.merging.tome_destinations`, `merge_into`);
then feeds the merged stream to block j's MLP and its residual, adds proportional attention (`size_bias`) to every
later block, and re-derives downstream shapes with `TokenPropagation`. So block j's MLP already runs on the merged
tokens, as in ToMe, where the default placement ("block", `passes.insert_merging`) merges in front of block j+1.
It knows the special tokens ToMe knows (a class token, and a distillation token beside it); a model with other
special tokens (registers) is refused with the way out.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from spot_compile.errors import StructureError
from spot_compile.graph.blocks import ModelStructure, query_key
from spot_compile.ops.merging import key_metric, tome_merge
from spot_compile.passes.emit import Emitter
from spot_compile.passes.insert_merging import SIZES_TAG, latest_sizes, rewire_size_bias
from spot_compile.passes.propagate_tokens import TokenPropagation


def special_tokens_as_tome(structure: ModelStructure) -> tuple[bool, bool]:
    """(class token, distillation token) as ToMe's matching protects them; StructureError for other special tokens."""
    special, has_class = structure.num_special, structure.has_class_token
    if special == 0 or (has_class and special <= 2):
        return has_class and special >= 1, has_class and special == 2
    raise StructureError(f"merge_at='attention' follows ToMe's published code, which protects a class token and a "
                         f"distillation token; this model has {special} special tokens (registers?): use merge_at='block'")


def merge_in_block(gm: GraphModule, structure: ModelStructure, block: int, keep: int) -> Node | None:
    """Merges to `num_special + keep` tokens inside block `block`, between its attention and its MLP; returns the
    merged stream node (None where nothing had to change)."""
    class_token, distill_token = special_tokens_as_tome(structure)
    target = structure.blocks[block]
    stream = target.attn_residual
    tokens_in = int(stream.meta["val"].shape[1])
    patch_tokens = tokens_in - structure.num_special
    if keep == patch_tokens:
        return None
    if not patch_tokens - patch_tokens // 2 <= keep < patch_tokens:
        raise StructureError(f"stage at block {block}: ToMe's merging can keep {patch_tokens - patch_tokens // 2}.."
                             f"{patch_tokens} of {patch_tokens} tokens (one merge per token of one half), not {keep}")
    qk = query_key(target)
    if qk is None:
        raise StructureError(f"block {block}'s attention scores come from an einsum, whose keys merging cannot read; "
                             "use merge_at='block'")
    if target.mlp_residual is None:
        raise StructureError(f"block {block} has no MLP after its attention to merge in front of; use merge_at='block'")
    emit = Emitter(gm, stream.next, f"merge@{block}")
    batch = emit(torch.ops.aten.sym_size.int, stream, 0)
    metric = emit(key_metric, qk[1], batch, qk[2])
    merged = emit(tome_merge, stream, latest_sizes(gm), metric, class_token, distill_token, structure.num_special + keep)
    tokens = emit(operator.getitem, merged, 0)
    sizes = emit(operator.getitem, merged, 1)
    sizes.meta[SIZES_TAG] = block + 1  # the sizes later blocks attend by
    stream.replace_all_uses_with(tokens, delete_user_cb=lambda user: user not in emit.nodes and user.op != "output")
    if block + 1 < len(structure.blocks):
        rewire_size_bias(gm, structure, block + 1, sizes)
    TokenPropagation(gm, stream, {tokens_in: structure.num_special + keep}, f"block {block}").run()
    return tokens
