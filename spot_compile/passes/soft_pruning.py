"""Pass: the calibration (training) graph, where pruning is a differentiable mask instead of a gather.

Matches the same stage points as `insert_pruning`. Emits at each stage:
  * mask-aware attention descriptor taps (`ops.interaction_descriptor` / `descriptor_from_logits` with `mask`) on the preceding blocks;
  * the scorer, called with `mask=` so its global context pools live tokens only;
  * `call_module spot_keep_<j>` (`SoftKeep`): a straight-through top-k mask (B, N) with the same static k as
    inference, multiplied into the previous stage's mask;
and rewrites the attention of every block from the stage on to masked attention (`ops.masked_attention` for SDPA,
`ops.masked_softmax` for an explicit softmax), so dropped tokens stop influencing live ones exactly where the
inference graph drops them. Token counts never change, so no shape is rewritten. With a binary mask, the output
equals the pruned graph's (tested).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .. import ops
from ..errors import StructureError
from .find_blocks import find_blocks
from .insert_pruning import SPOT_TAG


class SoftKeep(nn.Module):
    """Keeps the special tokens and the `keep` best live patch tokens; gradients reach the scores through sigmoid.

    In training, Gumbel noise times `noise` on the scores explores other selections (DynamicViT uses full Gumbel
    noise); with small logits, full noise makes training selections near-random while inference takes a
    deterministic top-k, so the scale is a knob. `soft_ratio` (B,) is the mean keep probability over live patch
    tokens, for the keep-ratio loss.
    """

    def __init__(self, num_special: int, keep: int, noise: float = 0.3) -> None:
        super().__init__()
        self.num_special, self.keep, self.noise = num_special, keep, noise
        self.soft_ratio: torch.Tensor | None = None

    def forward(self, scores: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        b, n = scores.shape
        special = torch.arange(n, device=scores.device) < self.num_special
        alive = torch.ones_like(scores, dtype=torch.bool) if prev is None else prev.detach() > 0.5
        patch_alive = alive & ~special
        noisy = scores
        if self.training and self.noise > 0:
            u = torch.rand_like(scores).clamp_(1e-6, 1 - 1e-6)
            noisy = scores - self.noise * torch.log(-torch.log(u))
        idx = noisy.masked_fill(~patch_alive, float("-inf")).topk(self.keep, dim=1).indices
        hard = torch.zeros_like(scores).scatter(1, idx, 1.0).masked_fill(special, 1.0)
        soft = torch.sigmoid(scores).masked_fill(special, 1.0)
        self.soft_ratio = (soft * patch_alive).sum(1) / patch_alive.sum(1)
        mask = hard + soft - soft.detach()
        return mask if prev is None else mask * prev


def build_calibration_graph(
    captured: GraphModule, stages: tuple[int, ...], keep: tuple[int, ...], scorers: dict[int, nn.Module], noise: float = 0.3
) -> tuple[GraphModule, dict[int, SoftKeep]]:
    from ..plan import clone_graph_module

    gm = clone_graph_module(captured)
    structure = find_blocks(gm)
    if structure.class_token is None:
        raise StructureError("calibration needs a model that reads a class token; models that average tokens are not supported yet")
    blocks, graph = structure.blocks, gm.graph
    qk = {b.index: (b.query, b.key, b.scale) if b.kind == "sdpa" else None for b in blocks}
    mask_at: dict[int, Node | None] = {b.index: None for b in blocks}
    keepers: dict[int, SoftKeep] = {}
    descriptors: dict[int, Node] = {}
    prev: Node | None = None  # the live-token mask entering the current stage
    bounds = list(stages[1:]) + [len(blocks)]
    for stage, k, end in zip(stages, keep, bounds):
        stream = blocks[stage].input
        scorer = scorers[stage]
        gm.add_submodule(f"spot_scorer_{stage}", scorer)
        keepers[stage] = SoftKeep(structure.num_special, k, noise)
        gm.add_submodule(f"spot_keep_{stage}", keepers[stage])
        with graph.inserting_before(stream.next):

            def emit(target, *args, op="call_function", **kwargs):
                node = graph.call_module(target, args, kwargs) if op == "call_module" else graph.call_function(target, args, kwargs)
                node.meta[SPOT_TAG] = f"calibration@{stage}"
                return node

            batch = emit(torch.ops.aten.sym_size.int, stream, 0)
            taps = []
            for b in blocks[max(0, stage - scorer.history):stage]:
                if b.index not in descriptors:  # consecutive stages read the block between them: emit once
                    live, special, cls = mask_at[b.index], structure.num_special, structure.class_token
                    if qk[b.index]:
                        descriptors[b.index] = emit(ops.interaction_descriptor, *qk[b.index], batch, special, cls, live)
                    else:
                        descriptors[b.index] = emit(ops.descriptor_from_logits, b.attention.args[0], batch, special, cls, live)
                taps.append(descriptors[b.index])
            scores = emit(f"spot_scorer_{stage}", stream, *taps, op="call_module", mask=prev)
            mask = emit(f"spot_keep_{stage}", scores, prev, op="call_module")
        for b in blocks[stage:end]:
            mask_at[b.index] = mask
            _mask_attention(gm, b, mask, qk)
        prev = mask
    gm.graph.lint()
    gm.recompile()
    return gm, keepers


def _mask_attention(gm: GraphModule, block, mask: Node, qk: dict) -> None:
    core = block.attention
    with gm.graph.inserting_before(core):
        if block.kind == "sdpa":
            q, k, scale = qk[block.index]
            new = gm.graph.call_function(ops.masked_attention, (q, k, core.args[2], mask, scale))
        else:
            new = gm.graph.call_function(ops.masked_softmax, (core.args[0], mask))
    new.meta[SPOT_TAG] = "calibration mask"
    core.replace_all_uses_with(new)
    gm.graph.erase_node(core)
    if block.kind != "sdpa":
        block.attention = new
