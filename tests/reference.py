"""An eager re-implementation of token pruning on the built-in ViT, written independently of the passes.

It runs the model's own modules block by block and drops tokens between them, so comparing it with the rewritten
graph checks the graph rewrite (insertion point, scorer inputs, shape rewrites), not just that it runs.
"""

import torch
import torch.nn.functional as F


def _qk(attn, h):
    b, n, c = h.shape
    if attn.fused:
        q, k, _ = attn.qkv(h).reshape(b, n, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k = (lin(h).reshape(b, n, attn.heads, attn.head_dim).transpose(1, 2) for lin in (attn.q, attn.k))
    return q, k


def eager_pruned(model, x, stages, keep, position_scores=None):
    """`position_scores` (P,), if given, replaces class attention: a token is worth its original grid position's score."""
    cfg = model.cfg
    x = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    prefix = [t.expand(x.shape[0], -1, -1) for t in (model.cls_token, model.registers) if t is not None]
    x = torch.cat([*prefix, x], dim=1) if prefix else x
    ns = len(prefix) and sum(p.shape[1] for p in prefix)
    qk = None
    origin = torch.arange(x.shape[1] - ns).expand(x.shape[0], -1)  # each live patch token's original grid position
    for i, blk in enumerate(model.blocks):
        if i in stages:
            if position_scores is None:
                q, k = qk
                probs = F.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
                scores = probs[:, :, 0, :].mean(1) if cfg.pool == "cls" else probs.mean(-2).mean(1)
                scores = scores[:, ns:]
            else:
                scores = position_scores[origin]
            order = scores.argsort(dim=1, descending=True)[:, : keep[stages.index(i)]].sort(dim=1).values
            origin = origin.gather(1, order)
            idx = order + ns
            x = torch.cat([x[:, :ns], torch.stack([x[b, idx[b]] for b in range(x.shape[0])])], dim=1)
        qk = _qk(blk.attn, blk.norm1(x) if cfg.norm == "pre" else x)
        x = blk(x)
    x = model.norm(x)
    if cfg.pool == "cls":
        return model.head(x[:, 0])
    return model.head(x[:, cfg.num_registers:].mean(dim=1))
