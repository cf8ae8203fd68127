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


def _attend(attn, h, log_size):
    """The block's attention on `h`, with log token sizes added to the logits (proportional attention); also its keys."""
    b, n, c = h.shape
    if attn.fused:
        q, k, v = attn.qkv(h).reshape(b, n, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (lin(h).reshape(b, n, attn.heads, attn.head_dim).transpose(1, 2) for lin in (attn.q, attn.k, attn.v))
    logits = q @ k.transpose(-2, -1) * attn.head_dim**-0.5
    if log_size is not None:
        logits = logits + log_size[:, None, None, :]
    out = logits.softmax(dim=-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, n, c)), k


def _merge_one(x, size, metric, ns, keep):
    """ToMe's bipartite matching for one image, with Python loops: x (N, D), size (N,), metric (N, C)."""
    patches = list(range(ns, x.shape[0]))
    set_a, set_b = patches[0::2], patches[1::2]
    m = F.normalize(metric, dim=-1)
    partner, score = {}, {}
    for a in set_a:
        sims = torch.stack([m[a] @ m[t] for t in set_b])
        partner[a], score[a] = set_b[int(sims.argmax())], float(sims.max())
    merged = sorted(set_a, key=lambda a: -score[a])[: len(patches) - keep]
    total = {t: x[t] * size[t] for t in patches}
    count = {t: size[t].clone() for t in patches}
    for a in merged:
        total[partner[a]] = total[partner[a]] + total[a]
        count[partner[a]] = count[partner[a]] + count[a]
    order = [a for a in set_a if a not in merged] + set_b
    new_x = torch.cat([x[:ns], torch.stack([total[t] / count[t] for t in order])])
    new_size = torch.cat([size[:ns], torch.stack([count[t] for t in order])])
    return new_x, new_size


def eager_merged(model, x, stages, keep):
    """Token merging on the built-in ViT, block by block: in front of each stage block, merge by the previous block's
    keys (averaged over heads); every block after the first merge weights keys by their token sizes."""
    cfg = model.cfg
    x = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    prefix = [t.expand(x.shape[0], -1, -1) for t in (model.cls_token, model.registers) if t is not None]
    x = torch.cat([*prefix, x], dim=1) if prefix else x
    ns = len(prefix) and sum(p.shape[1] for p in prefix)
    size, keys = None, None
    for i, blk in enumerate(model.blocks):
        if i in stages:
            size = torch.ones(x.shape[:2]) if size is None else size
            merged = [_merge_one(x[b], size[b], keys[b].mean(0), ns, keep[stages.index(i)]) for b in range(x.shape[0])]
            x, size = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        log_size = None if size is None else size.log()
        if cfg.norm == "pre":
            a, keys = _attend(blk.attn, blk.norm1(x), log_size)
            x = x + a
            x = x + blk.mlp(blk.norm2(x))
        else:
            a, keys = _attend(blk.attn, x, log_size)
            x = blk.norm1(x + a)
            x = blk.norm2(x + blk.mlp(x))
    x = model.norm(x)
    if cfg.pool == "cls":
        return model.head(x[:, 0])
    return model.head(x[:, cfg.num_registers:].mean(dim=1))


def tome_published_merge(x, size, metric, r, class_token, distill_token):
    """One merge as facebookresearch/ToMe publishes it (`tome/merge.py`: `bipartite_soft_matching`, then
    `merge_wavg`), restated here step by step: sets A and B alternate over all tokens; the class token's similarity
    row and the distillation token's column are -inf; the r best-matched A tokens are summed into their partners
    (sizes weight the sum); the unmerged A tokens stay in similarity order, sorted back only with a class token;
    with a distillation token the output reads [A0, B0, A1.., B1..]."""
    r = min(r, (metric.shape[1] - int(class_token) - int(distill_token)) // 2)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    similarity = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
    if class_token:
        similarity[:, 0, :] = float("-inf")
    if distill_token:
        similarity[:, :, 0] = float("-inf")
    best, partner = similarity.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    stay, go = ranked[:, r:], ranked[:, :r]
    if class_token:
        stay = stay.sort(dim=1).values
    into = partner.gather(1, go)

    def combine(t):
        a, b = t[:, ::2], t[:, 1::2]
        width = t.shape[-1]
        kept = a.gather(1, stay[..., None].expand(-1, -1, width))
        b = b.scatter_reduce(1, into[..., None].expand(-1, -1, width), a.gather(1, go[..., None].expand(-1, -1, width)), reduce="sum")
        if distill_token:
            return torch.cat([kept[:, :1], b[:, :1], kept[:, 1:], b[:, 1:]], dim=1)
        return torch.cat([kept, b], dim=1)

    size = torch.ones_like(x[..., :1]) if size is None else size
    summed, size = combine(x * size), combine(size)
    return summed / size, size


@torch.no_grad()
def tome_published_logits(model, x, r):
    """A timm VisionTransformer's logits with ToMe's published timm patch (`tome/patch/timm.py`, prop_attn on): in each
    block, attention with the log token sizes added to its logits, then `r[i]` tokens merged on the mean of the
    block's keys over heads, then the MLP on the merged tokens."""
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = None
    for block, merges in zip(model.blocks, r):
        attn = block.attn
        y = block.norm1(h)
        b, n, c = y.shape
        q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = q @ k.transpose(-2, -1) * attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        h = h + block.ls1(attn.proj(getattr(attn, "norm", torch.nn.Identity())(out)))
        if merges > 0:
            h, size = tome_published_merge(h, size, k.mean(1), merges, class_token, distill_token)
        h = h + block.ls2(block.mlp(block.norm2(h)))
    return model.forward_head(model.norm(h))
