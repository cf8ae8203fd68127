"""Attention summaries a scorer reads (class attention, attention received, SPOT's O(N·d) interaction descriptor)
and the masked attention of the calibration graph.
"""

from __future__ import annotations

import torch


def _per_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, H, ..., N) or (B*H, ..., N) -> (B, H', N) with the head axis folded in."""
    return x.reshape(batch, -1, x.shape[-1])


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """softmax(q kᵀ · scale), formed explicitly: used only at the few layers a predictor reads."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)


def class_attention_qk(q: torch.Tensor, k: torch.Tensor, scale: float | None, batch: int, cls: int = 0) -> torch.Tensor:
    """Attention the class token (query `cls`) pays to every token, mean over heads: O(N·d), no N×N matrix."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    row = (q[..., cls : cls + 1, :] @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    return _per_batch(row, batch).mean(dim=1)


def class_attention_probs(probs: torch.Tensor, batch: int, cls: int = 0) -> torch.Tensor:
    return _per_batch(probs[..., cls, :], batch).mean(dim=1)


def attention_received(probs: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean attention each token receives over all queries and heads (for models without a class token)."""
    return _per_batch(probs.mean(dim=-2), batch).mean(dim=1)


def interaction_descriptor(
    q: torch.Tensor, k: torch.Tensor, scale: float | None, batch: int, num_special: int, cls: int | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPOT's compact per-token summary of one block's attention, (B, N, H*4), from its queries and keys.

    O(N·d) per head: the N×N matrix is never formed, so a fused SDPA stays fused. See `descriptor_from_logits`
    for the features; every one is a linear functional of the logits s·q·kᵀ, which is what makes this and the
    matrix form agree exactly.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n, d = q.shape[-2], q.shape[-1]
    q, k = q.reshape(batch, -1, n, d), k.reshape(batch, -1, n, d)
    if mask is None:  # every token live: plain means, no weights to build (a batch-1 forward feels each kernel)
        live = None
        q_mean, k_mean = q[:, :, num_special:].mean(-2, keepdim=True), k[:, :, num_special:].mean(-2, keepdim=True)
    else:
        live, patch_w = _live_weights(mask, num_special, q.dtype)
        w = patch_w[:, None, :, None]
        q_mean, k_mean = (q * w).sum(-2, keepdim=True), (k * w).sum(-2, keepdim=True)
    mean_query = (q_mean @ k.transpose(-2, -1)).squeeze(-2) * scale  # logits of the average patch query
    row_mean = (q @ k_mean.transpose(-2, -1)).squeeze(-1) * scale  # each token's mean logit over patch keys
    if cls is None:
        cls_row = cls_col = None
    else:
        cls_row = (q[:, :, cls : cls + 1] @ k.transpose(-2, -1)).squeeze(-2) * scale
        cls_col = (q @ k[:, :, cls : cls + 1].transpose(-2, -1)).squeeze(-1) * scale
    return _descriptor(cls_row, cls_col, mean_query, row_mean, live)


def descriptor_from_logits(
    logits: torch.Tensor, batch: int, num_special: int, cls: int | None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The same descriptor as `interaction_descriptor`, read from a block's pre-softmax logits where the backbone
    already forms them (explicit attention). Per head:
      * CLS-out: softmax over live keys of the class token's row (EViT's criterion), times the live count;
      * received: softmax over live keys of the average patch query's row: first-order attention received;
      * CLS-in: the token's logit towards the class token minus its mean logit over patch keys;
      * mean logit of the token's row over patch keys (how strongly it attends at all).
    `mask` (B, N), 1 for live tokens, restricts everything to live tokens: with a binary mask the live rows equal
    what the pruned graph computes on the surviving tokens alone (the calibration graph relies on this).
    Without a class token, the two CLS features are zero.
    """
    n = logits.shape[-1]
    a = logits.reshape(batch, -1, n, n)
    if mask is None:
        live = None
        mean_query, row_mean = a[:, :, num_special:, :].mean(-2), a[:, :, :, num_special:].mean(-1)
    else:
        live, patch_w = _live_weights(mask, num_special, a.dtype)
        mean_query = (a * patch_w[:, None, :, None]).sum(-2)
        row_mean = (a * patch_w[:, None, None, :]).sum(-1)
    cls_row, cls_col = (None, None) if cls is None else (a[:, :, cls, :], a[:, :, :, cls])
    return _descriptor(cls_row, cls_col, mean_query, row_mean, live)


def _live_weights(mask: torch.Tensor, num_special: int, dtype: torch.dtype):
    """(live (B, N) in {0, 1}, live patch tokens weighted 1/their count (B, N))."""
    live = mask.to(dtype)
    patch = torch.cat([torch.zeros_like(live[:, :num_special]), live[:, num_special:]], dim=1)
    return live, patch / patch.sum(1, keepdim=True)


def _descriptor(cls_row, cls_col, mean_query, row_mean, live: torch.Tensor | None) -> torch.Tensor:
    """`live` None: every token is live."""
    # Softmax-normalised features are scaled by the live count so they are O(1) whatever N is (uniform: 1).
    if live is None:
        def live_softmax(x):
            return x.softmax(-1) * x.shape[-1]
    else:
        dead, n_live = (live == 0)[:, None, :], live.sum(1)[:, None, None]

        def live_softmax(x):
            return x.masked_fill(dead, float("-inf")).softmax(-1) * n_live
    received = live_softmax(mean_query)
    if cls_row is None:
        cls_out = cls_in = torch.zeros_like(received)
    else:
        cls_out = live_softmax(cls_row)
        cls_in = cls_col - row_mean
    feats = torch.stack([cls_out, received, cls_in, row_mean], dim=-1)  # (B, H, N, 4)
    b, _, n, _ = feats.shape
    return feats.permute(0, 2, 1, 3).reshape(b, n, -1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over keys where dropped keys (mask 0) get no weight; each query still sees itself (DynamicViT).

    With a binary mask, the rows of live queries equal a softmax over the live tokens alone, so a calibration
    graph that masks is, in its forward pass, the graph that prunes.
    """
    b, n = mask.shape
    s = scores.reshape(b, -1, n, n)
    eye = torch.eye(n, dtype=s.dtype, device=s.device)
    policy = mask.to(s.dtype)[:, None, None, :] * (1 - eye) + eye
    e = (s - s.amax(dim=-1, keepdim=True)).exp() * policy
    return (e / e.sum(dim=-1, keepdim=True)).reshape(scores.shape)


def masked_attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None, mask: torch.Tensor | None) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    return s.softmax(dim=-1) if mask is None else masked_softmax(s, mask)


def masked_attention(q, k, v, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return masked_attention_probs(q, k, scale, mask) @ v
