"""ToMe's merging maths (Bolya et al., ICLR 2023): key similarity features, bipartite soft matching with
size-weighted averages, and the log-size bias of proportional attention. The graph wiring is `passes.insert_merging`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    if sizes is None:
        sizes = tokens.new_ones(b, n, 1)
    partner, merged_a, kept_a = _match(metric, s, n - s - keep)
    # The size rides along as one more channel, so tokens and sizes move through a single gather and scatter.
    x = torch.cat([tokens[:, s:] * sizes[:, s:], sizes[:, s:]], dim=-1)
    xa, xb = x[:, ::2], x[:, 1::2]
    xb = xb.scatter_add(1, partner.gather(1, merged_a)[..., None].expand(-1, -1, d + 1),
                        xa.gather(1, merged_a[..., None].expand(-1, -1, d + 1)))
    out = torch.cat([xa.gather(1, kept_a[..., None].expand(-1, -1, d + 1)), xb], dim=1)
    out_sizes = out[..., d:]
    return torch.cat([tokens[:, :s], out[..., :d] / out_sizes], dim=1), torch.cat([sizes[:, :s], out_sizes], dim=1)


def _match(metric: torch.Tensor, num_special: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching of the patch tokens: each A token's most similar B token (`partner`, B x |A|), the
    `r` A tokens merged (most similar first) and the A tokens kept, in their order."""
    m = F.normalize(metric[:, num_special:], dim=-1)
    similarity = m[:, ::2] @ m[:, 1::2].transpose(-2, -1)  # (B, |A|, |B|)
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    return partner, order[:, :r], order[:, r:].sort(dim=-1).values


def merge_destinations(metric: torch.Tensor, num_special: int, keep: int) -> torch.Tensor:
    """(B, N) long: for each token entering `merge_tokens` with this `metric`, the index of the token it is part of
    afterwards (special tokens stay where they are), so that merged groups can be traced and drawn."""
    b, n, _ = metric.shape
    s = num_special
    partner, merged_a, kept_a = _match(metric, s, n - s - keep)
    a_count, kept = partner.shape[1], kept_a.shape[1]
    dest_a = torch.empty(b, a_count, dtype=torch.long, device=metric.device)
    dest_a.scatter_(1, kept_a, s + torch.arange(kept, device=metric.device).expand(b, -1))
    dest_a.scatter_(1, merged_a, s + kept + partner.gather(1, merged_a))
    dest_b = s + kept + torch.arange(n - s - a_count, device=metric.device).expand(b, -1)
    dest = torch.empty(b, n, dtype=torch.long, device=metric.device)
    dest[:, :s] = torch.arange(s, device=metric.device)
    dest[:, s::2], dest[:, s + 1 :: 2] = dest_a, dest_b
    return dest


def tome_destinations(metric: torch.Tensor, class_token: bool, distill_token: bool, r: int) -> torch.Tensor:
    """(B, N) long: where each of N tokens goes under ToMe's published matching (`tome/merge.py`,
    `bipartite_soft_matching`), which runs over *all* tokens: alternate tokens form sets A and B, so the class token
    is A's first and a distillation token B's first; the class token's row and the distillation token's column of
    the similarities are -inf, so neither is ever merged; the r best-matched A tokens go into their partners. The
    output is ToMe's: the unmerged A tokens (in their order where there is a class token, else most similar first),
    then B; with a distillation token, class and distillation token first."""
    b, n, _ = metric.shape
    m = F.normalize(metric, dim=-1)
    similarity = m[:, ::2] @ m[:, 1::2].transpose(-2, -1)  # (B, |A|, |B|)
    if class_token:
        similarity[:, 0, :] = -math.inf
    if distill_token:
        similarity[:, :, 0] = -math.inf
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:]
    if class_token:
        kept_a = kept_a.sort(dim=-1).values
    a_count, kept = partner.shape[1], kept_a.shape[1]
    device = metric.device
    unmerged_slot = torch.arange(kept, device=device)
    b_slot = kept + torch.arange(n - a_count, device=device)
    if distill_token:  # [unmerged A 0 (the class token), B 0 (the distillation token), unmerged A 1.., B 1..]
        unmerged_slot = torch.where(unmerged_slot > 0, unmerged_slot + 1, unmerged_slot)
        b_slot = torch.where(b_slot > kept, b_slot, torch.ones_like(b_slot))
    dest_a = torch.empty(b, a_count, dtype=torch.long, device=device)
    dest_a.scatter_(1, kept_a, unmerged_slot.expand(b, -1))
    dest_a.scatter_(1, merged_a, b_slot[partner.gather(1, merged_a)])
    dest = torch.empty(b, n, dtype=torch.long, device=device)
    dest[:, ::2], dest[:, 1::2] = dest_a, b_slot.expand(b, -1)
    return dest


def merge_into(tokens: torch.Tensor, sizes: torch.Tensor | None, dest: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted averages of `tokens` (B, N, D) into `count` tokens, token i going into `dest[:, i]` (ToMe's
    `merge_wavg`); and their sizes (B, count, 1). `sizes` None: one patch each."""
    b, n, d = tokens.shape
    if sizes is None:
        sizes = tokens.new_ones(b, n, 1)
    x = torch.cat([tokens * sizes, sizes], dim=-1)  # the size rides along: one scatter for both
    out = x.new_zeros(b, count, d + 1).scatter_add(1, dest[..., None].expand(-1, -1, d + 1), x)
    return out[..., :d] / out[..., d:], out[..., d:]


def tome_merge(tokens: torch.Tensor, sizes: torch.Tensor | None, metric: torch.Tensor, class_token: bool,
               distill_token: bool, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's merge as published, to `keep` tokens in all (`tome_destinations`, `merge_into`)."""
    dest = tome_destinations(metric, class_token, distill_token, tokens.shape[1] - keep)
    return merge_into(tokens, sizes, dest, keep)


def size_bias(sizes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """log(sizes) shaped to add to the attention logits of keys laid out as `like` (the queries or the logits):
    (B, 1, 1, N) for (B, H, N, .) and (B*H, 1, N) for (B*H, N, .), batch-major as nn.MultiheadAttention folds it."""
    bias = sizes.squeeze(-1).log().to(like.dtype)  # (B, N)
    if like.dim() == 4:
        return bias[:, None, None, :]
    return bias.repeat_interleave(like.shape[0] // sizes.shape[0], dim=0)[:, None, :]
