"""Pass: the calibration (training) graph, where each stage's decision is a differentiable mask for one block.

Matches the same stage points as `insert_pruning`. Emits at stage j (in front of block j), taps and positions
through `passes.taps` as inference does:
  * attention descriptor taps (`ops.interaction_descriptor` / `descriptor_from_logits`) on the preceding blocks,
    mask-aware where that block attended under a mask, and carried through the gathers made since;
  * for a scorer with `positions` set, the patch-grid index of each token alive at the stage (as in `insert_pruning`);
  * the scorer and `call_module spot_keep_<j>` (`SoftKeep`): a straight-through top-k mask (B, N) with the same
    static k as inference, and the kept tokens' indices from that same top-k (one per stage, shared by the
    stream's gather and every descriptor carried past the stage);
  * block j's attention rewritten to masked attention (`ops.masked_attention` for SDPA, `ops.masked_softmax` for
    an explicit softmax): dropped tokens get no weight as keys, and the mask gets a gradient from every query;
  * after block j's attention residual, `ops.prune_tokens(x, mask, ..., kept)`: the kept tokens are gathered, and all
    later blocks run on them alone, as in inference (downstream shapes re-derived by `TokenPropagation`);
  * with `mask_gradient="downstream"`, `ops.scale_by_keep` right after that gather: the identity in the
    forward pass, it gives each kept token's mask entry the gradient of scaling that token through every later block;
  * `call_module spot_final_tokens` (`TokenTap`, an identity that keeps its input) on the last block's output, so
    the recipe can distill the surviving tokens towards the dense model's (`tap_final_tokens` puts one in a teacher).
With `mask_gradient="full"` (DynamicViT's masking) there is no gather at the stages: dropped tokens stay in the
stream, every block from the first stage on attends under the product of the stages' masks so far (`live`), a later
stage's `SoftKeep` picks its top-k among the live tokens and the predictor's context is their mean (`live=`), and one
gather after the last block (then `ops.scale_by_keep`) hands the survivors to the head.
With a binary mask the output equals the pruned graph's, in every mode (tested).

Why the gather: with it ("block"), a score's only gradient is the key mask of the stage's block: what a token is
worth downstream, where the gather removes it, never reaches the predictor, and at high keep ratios, where the top-k
boundary lies in the background, that one block's estimate is noise. "downstream" adds the gradient of every later
block for the kept tokens' residual streams, at the cost of one multiply per stage; a dropped token still learns only
from the stage's block. "full" gives dropped tokens every later block's gradient too, at the cost of computing them
there. "block" is the default because it alone held up over a full-length calibration; the measurements, and the
variants withdrawn after measuring, are in docs/research/mask_gradient.md.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from spot_compile import ops
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import clone_graph_module
from spot_compile.passes.emit import SPOT_TAG
from spot_compile.passes.pipeline import run_passes
from spot_compile.passes.propagate_tokens import TokenPropagation, fake_execute
from spot_compile.passes.taps import attention_tap, follow, grid_positions


class SoftKeep(nn.Module):
    """Keeps the special tokens and the `keep` best patch tokens; gradients reach the scores through sigmoid.

    In training, Gumbel noise times `noise` on the scores explores other selections (DynamicViT uses full Gumbel
    noise); with small logits, full noise makes training selections near-random while inference takes a
    deterministic top-k, so the scale is a knob. `soft_ratio` (B,) is the mean keep probability over the patch
    tokens, for the keep-ratio loss. Returns (mask, kept): kept tokens read 1 and dropped ones 0 in the forward
    pass of the mask, and `kept` (B, keep) holds the kept patch tokens' indices in token order, which is what
    `ops.kept_patch_indices(mask, ...)` would find again with a second top-k.
    """

    def __init__(self, num_special: int, keep: int, noise: float = 0.3) -> None:
        super().__init__()
        self.num_special, self.keep, self.noise = num_special, keep, noise
        self.soft_ratio: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None  # (B, keep) indices of the kept patch tokens, in token order

    def forward(self, scores: torch.Tensor, live: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`live` (B, N), the mask of the tokens still alive where dropped tokens stay in the stream ("full"): the
        top-k then picks among them, the returned indices count all patch tokens, and `kept` stays relative to the
        previous stage's kept tokens (what `kept_positions` composes)."""
        special = torch.arange(scores.shape[1], device=scores.device) < self.num_special
        noisy = scores
        if self.training and self.noise > 0:
            u = torch.rand_like(scores).clamp_(1e-6, 1 - 1e-6)
            noisy = scores - self.noise * torch.log(-torch.log(u))
        excluded = special if live is None else special | (live.detach() == 0)
        idx = noisy.masked_fill(excluded, float("-inf")).topk(self.keep, dim=1).indices.sort(dim=1).values
        hard = torch.zeros_like(scores).scatter(1, idx, 1.0).masked_fill(special, 1.0)
        soft = torch.sigmoid(scores).masked_fill(special, 1.0)
        if live is None:
            self.kept = idx - self.num_special
            self.soft_ratio = soft[:, self.num_special:].mean(1)
        else:
            alive = live.detach()[:, self.num_special:]
            self.kept = (alive.cumsum(1) - 1).long().gather(1, idx - self.num_special)
            self.soft_ratio = (soft[:, self.num_special:] * alive).sum(1) / alive.sum(1)
        return hard + soft - soft.detach(), idx - self.num_special


class TokenTap(nn.Module):
    """Identity that keeps the tokens passing through it (`value`), for a loss on a graph's inner tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.value = tokens
        return tokens


def tap_final_tokens(gm: GraphModule, stream: Node | None = None) -> TokenTap:
    """Splices a `TokenTap` (`gm.spot_final_tokens`) after `stream`, by default the last block's output."""
    if stream is None:
        stream = find_blocks(gm).blocks[-1].output
    tap = TokenTap()
    gm.add_submodule("spot_final_tokens", tap)
    with gm.graph.inserting_after(stream):
        node = gm.graph.call_module("spot_final_tokens", (stream,))
    node.meta[SPOT_TAG] = "final tokens"
    node.meta["val"] = stream.meta.get("val")
    stream.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    gm.graph.lint()
    gm.recompile()
    return tap


def kept_positions(keepers: list[SoftKeep], patch_tokens: int) -> torch.Tensor:
    """(B, k_last): for each patch token that survives every stage, its index among the input's patch tokens."""
    pos = None
    for keeper in keepers:
        pos = keeper.kept if pos is None else pos.gather(1, keeper.kept)
    return pos if pos is not None else torch.arange(patch_tokens)[None]


MASK_GRADIENTS = ("block", "downstream", "full")  # the first is the default


def build_calibration_graph(
    captured: GraphModule, stages: tuple[int, ...], keep: tuple[int, ...], scorers: dict[int, nn.Module], noise: float = 0.3,
    mask_gradient: str = MASK_GRADIENTS[0],
) -> tuple[GraphModule, dict[int, SoftKeep]]:
    """A calibration graph over a clone of `captured` (`SoftPruning` through `passes.pipeline`), and its keepers."""
    soft = SoftPruning(stages, keep, scorers, noise, mask_gradient)
    gm = run_passes(clone_graph_module(captured), [soft]).graph_module
    return gm, soft.keepers


class SoftPruning(PassBase):
    """This module's pass (see the module docstring); `keepers` holds the `SoftKeep` of each stage once it ran."""

    def __init__(self, stages: tuple[int, ...], keep: tuple[int, ...], scorers: dict[int, nn.Module], noise: float = 0.3,
                 mask_gradient: str = MASK_GRADIENTS[0]) -> None:
        if mask_gradient not in MASK_GRADIENTS:
            raise ValueError(f"mask_gradient must be one of {MASK_GRADIENTS}, got {mask_gradient!r}")
        self.stages, self.keep, self.scorers, self.noise, self.mask_gradient = stages, keep, scorers, noise, mask_gradient
        self.keepers: dict[int, SoftKeep] = {}

    def call(self, graph_module: GraphModule) -> PassResult:
        self.keepers = _insert_soft_pruning(graph_module, self.stages, self.keep, self.scorers, self.noise,
                                            self.mask_gradient)
        return PassResult(graph_module, True)


def _insert_soft_pruning(
    gm: GraphModule, stages: tuple[int, ...], keep: tuple[int, ...], scorers: dict[int, nn.Module], noise: float,
    mask_gradient: str,
) -> dict[int, SoftKeep]:
    structure = find_blocks(gm)
    blocks, graph, special = structure.blocks, gm.graph, structure.num_special
    qk = {b.index: (b.query, b.key, b.scale) if b.kind == "sdpa" else None for b in blocks}
    keepers: dict[int, SoftKeep] = {}
    masks: dict[int, Node] = {}  # stage block -> the keep mask its attention uses
    final = blocks[-1].output  # replaced by its gather if the last block is a stage with no MLP
    live: Node | None = None  # "full": the product of the stages' masks so far
    last: tuple[Node, int] = ()  # "full": the last stage's kept indices (into all patch tokens) and their count
    gathers: list[tuple] = []  # (first block after it, *the gather's selection: mask, special, keep, False, kept)
    descriptors: dict[int, tuple[Node, int]] = {}  # block -> (descriptor node, how many of its gathers it has followed)
    for stage, k in zip(stages, keep):
        stream = blocks[stage].input
        scorer = scorers[stage]
        gm.add_submodule(f"spot_scorer_{stage}", scorer)
        keepers[stage] = SoftKeep(special, k, noise)
        gm.add_submodule(f"spot_keep_{stage}", keepers[stage])
        with graph.inserting_before(stream.next):

            def emit(target, *args, op="call_function", **kwargs):
                node = graph.call_module(target, args, kwargs) if op == "call_module" else graph.call_function(target, args, kwargs)
                node.meta[SPOT_TAG] = f"calibration@{stage}"
                node.meta["val"] = fake_execute(gm, node)
                return node

            batch = emit(torch.ops.aten.sym_size.int, stream, 0)
            taps = []
            for b in blocks[max(0, stage - scorer.history):stage]:
                # each block's descriptor is emitted once, on the tokens it attended over, and carried from where
                # the last stage that read it left it through the gathers made since
                node, followed = descriptors.get(b.index) or (
                    attention_tap(gm, emit, b, "descriptor", batch, structure, masks.get(b.index), qk[b.index]), 0)
                later = [g[1:] for g in gathers if g[0] > b.index]
                node = follow(emit, node, later[followed:])
                descriptors[b.index] = (node, len(later))
                taps.append(node)
            kwargs = {} if live is None else {"live": live}
            if getattr(scorer, "positions", False):
                kwargs["positions"] = grid_positions(gm, emit, structure, [g[1:] for g in gathers])
            scores = emit(f"spot_scorer_{stage}", stream, *taps, op="call_module", **kwargs)
            decision = emit(f"spot_keep_{stage}", scores, *([live] if live is not None else []), op="call_module")
            mask, kept = emit(operator.getitem, decision, 0), emit(operator.getitem, decision, 1)
            if mask_gradient == "full":  # a token dropped at any stage so far stays dropped
                live = mask if live is None else emit(torch.ops.aten.mul.Tensor, mask, live)
        if mask_gradient == "full":
            # Dropped tokens stay in the stream, and every block from here on attends under the live mask.
            for b in blocks[stage:next(iter(s for s in stages if s > stage), len(blocks))]:
                masks[b.index] = live
                _mask_attention(gm, b, live, qk)
            last = (kept, k)
            continue
        masks[stage] = mask
        _mask_attention(gm, blocks[stage], mask, qk)
        # Past the block's attention its dropped tokens are never read again (the MLP is per token): gather the kept ones.
        residual = blocks[stage].attn_residual
        gathered = _gather_and_scale(gm, residual, mask, special, kept, k, stage, scale=mask_gradient == "downstream")
        final = gathered if final is residual else final
        gathers.append((stage + 1, mask, special, k, False, kept))
    if mask_gradient == "full":  # the survivors are gathered once, after the last block, for the head
        final = _gather_and_scale(gm, final, live, special, *last, "end")
    tap_final_tokens(gm, final)
    return keepers


def _gather_and_scale(gm: GraphModule, stream: Node, mask: Node, special: int, kept: Node, k: int, where,
                      scale: bool = True) -> Node:
    """`stream`'s kept tokens (`ops.prune_tokens`), then, with `scale`, `ops.scale_by_keep` on them, in place of
    `stream` for every later node; later shapes are re-derived (`TokenPropagation`). Returns the node now read."""
    graph = gm.graph
    with graph.inserting_before(stream.next):
        gather = gathered = graph.call_function(ops.prune_tokens, (stream, mask, special, k, False, kept))
        gather.meta[SPOT_TAG] = f"calibration gather@{where}"
        if scale:
            gathered = graph.call_function(ops.scale_by_keep, (gather, mask, special, kept))
            gathered.meta[SPOT_TAG] = f"calibration downstream gradient@{where}"
    stream.replace_all_uses_with(gathered, delete_user_cb=lambda user: user is not gather)
    TokenPropagation(gm, stream, {int(stream.meta["val"].shape[1]): special + k}, f"block {where}").run()
    return gathered


def _mask_attention(gm: GraphModule, block, mask: Node, qk: dict) -> None:
    core = block.attention
    with gm.graph.inserting_before(core):
        if block.kind == "sdpa":
            q, k, scale = qk[block.index]
            new = gm.graph.call_function(ops.masked_attention, (q, k, core.args[2], mask, scale))
        else:
            new = gm.graph.call_function(ops.masked_softmax, (core.args[0], mask))
    new.meta[SPOT_TAG] = "calibration mask"
    new.meta["val"] = fake_execute(gm, new)
    core.replace_all_uses_with(new)
    gm.graph.erase_node(core)
    if block.kind != "sdpa":
        block.attention = new
