"""Token selection ops: top-k of scores, pruning (with EViT's fusion of the dropped tokens), positions in the patch
grid, and the straight-through scaling of the calibration graph.
"""

from __future__ import annotations

import torch


def prune_tokens(
    tokens: torch.Tensor, scores: torch.Tensor, num_special: int, keep: int, fuse: bool = False,
    kept_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keeps the `num_special` leading tokens and the `keep` best-scored others, in their original order.

    With `fuse`, the dropped tokens are averaged (weighted by softmax of their scores) into one extra last token,
    as EViT does, so their information is not lost entirely. `kept_idx`, if given, is
    `kept_patch_indices(scores, num_special, keep)` computed once for every tensor pruned by the same scores
    (top-k and sort are library calls that Inductor does not merge when they appear twice).
    """
    special, rest = tokens[:, :num_special], tokens[:, num_special:]
    rest_scores = scores[:, num_special:]
    idx = kept_patch_indices(scores, num_special, keep) if kept_idx is None else kept_idx
    kept = rest.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    if not fuse:
        return torch.cat([special, kept], dim=1)
    dropped = torch.ones_like(rest_scores, dtype=torch.bool).scatter(1, idx, False)
    weights = rest_scores.float().masked_fill(~dropped, float("-inf")).softmax(dim=1).to(tokens.dtype)
    fused = torch.einsum("bn,bnd->bd", weights, rest).unsqueeze(1)
    return torch.cat([special, kept, fused], dim=1)


def scale_by_keep(tokens: torch.Tensor, mask: torch.Tensor, num_special: int, kept_idx: torch.Tensor) -> torch.Tensor:
    """`tokens` (gathered by `kept_idx`, special tokens first) times 1 + (m - m.detach()), m the kept tokens' entries
    of the straight-through `mask` (B, N).

    Exactly the identity in the forward pass, whatever the mask's value; in the backward pass each kept token's mask
    entry gets <token, dL/dtoken>: the first-order change of the loss if the token's residual stream were scaled
    away, through every block after the gather (the gather's indices carry no gradient of their own).
    """
    m = mask[:, num_special:].gather(1, kept_idx)
    scale = torch.cat([torch.ones_like(mask[:, :num_special]), 1.0 + (m - m.detach())], dim=1)
    return tokens * scale.unsqueeze(-1).to(tokens.dtype)


def token_positions(tokens: torch.Tensor, num_special: int) -> torch.Tensor:
    """(B, N, 1) float32: each token's index among the patch tokens of `tokens` (special tokens read -1).

    Carried through later prunes like a token feature (`prune_tokens` gathers it with the stream), it tells a stage
    where its surviving tokens sit in the image. float32 holds any realistic token count exactly, unlike bf16.
    """
    # Not `(arange - num_special).clamp(min=-1)`: Inductor folds that clamp into a sympy Max over the index of a
    # pointwise `cat` (prune_tokens' special + kept), which sympy cannot order ("'-1 + ((0))' is not comparable";
    # the default lowering on GPUs, torch 2.11 and 2.14). A float arange and `where` stay values.
    pos = torch.arange(tokens.shape[1], device=tokens.device, dtype=torch.float32) - num_special
    pos = torch.where(pos < 0, -1.0, pos)
    return pos[None, :, None].expand(tokens.shape[0], -1, 1)


def kept_patch_indices(scores: torch.Tensor, num_special: int, keep: int) -> torch.Tensor:
    """(B, keep): the indices, among the non-special tokens, of the `keep` best-scored ones, ascending."""
    # Sorting the kept indices keeps the surviving tokens in raster order: later stages and the token maps rely
    # on it, and it costs a sort of `keep` integers.
    return scores[:, num_special:].topk(keep, dim=1, sorted=False).indices.sort(dim=1).values


def kept_indices(scores: torch.Tensor, num_special: int, keep: int) -> torch.Tensor:
    """The token indices (into the stage's input) that `prune_tokens` keeps, special tokens first."""
    idx = kept_patch_indices(scores, num_special, keep) + num_special
    special = torch.arange(num_special, device=scores.device).expand(scores.shape[0], -1)
    return torch.cat([special, idx], dim=1)
