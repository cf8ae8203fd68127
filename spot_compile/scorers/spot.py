"""SPOT's learned token-relevance predictors.

One small predictor per pruning stage reads three signals and gives one relevance logit per token:
  1. embedding: the token's state at that depth (LayerNorm + linear);
  2. interaction: the attention descriptor of the last block before the stage (`ops.interaction_descriptor`:
     per head, CLS-out, attention received from the average query, CLS-in and mean logit; O(N·d) from q and k);
  3. dynamics: how that descriptor changed from the block before it.
A global context (mean of the per-token features over the tokens the stage sees) is appended, as in DynamicViT, so
each token is judged relative to the image. Any signal can be switched off for an ablation. Their file format is
`serialization.predictors`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spot_compile.graph.blocks import ModelStructure
from spot_compile.scorers.coverage_prior import coverage_prior
from spot_compile.scorers.predictor_config import SIGNALS, PredictorConfig

__all__ = ["DESCRIPTOR_FEATURES", "SIGNALS", "PredictorConfig", "SpotPredictor", "make_predictors"]

DESCRIPTOR_FEATURES = 4  # per head, see ops.descriptor_from_logits


class SpotPredictor(nn.Module):
    """relevance = w2·gelu(W1·gelu([h, mean(h)]) + b1) + b2, with
    h = W_e·LN(token) + W_i·descriptor + W_d·(descriptor - previous descriptor) + b,
    plus `config.coverage` times the token's coverage prior when that weight is not zero.

    The forward evaluates that same function in a cheaper order (the predictor runs on every token of a narrow model,
    where a handful of small kernels cost more than their FLOPs suggest): the three input linears as one GEMM over
    the concatenated inputs, the context half of W1 once per image instead of once per token (GELU is elementwise,
    so W1·gelu([h, c]) = W1a·gelu(h) + W1b·gelu(c)), and the last layer (one output) as a multiply-reduce.
    """

    attention = "descriptor"
    history = 2  # the last two blocks: their descriptors and the change between them

    def __init__(self, dim: int, heads: int, config: PredictorConfig = PredictorConfig(), patch_tokens: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.positions = config.coverage > 0  # asks the pass for each token's grid position
        if self.positions:
            if patch_tokens is None:
                raise ValueError("a predictor with a coverage prior needs the model's patch token count")
            # Not saved: it follows from the token count, which the checkpoint's fingerprint already pins.
            self.register_buffer("prior", coverage_prior(patch_tokens), persistent=False)
        feat, hid = DESCRIPTOR_FEATURES * heads, config.hidden
        self.embedding = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hid)) if "embedding" in config.signals else None
        self.interaction = nn.Linear(feat, hid) if "interaction" in config.signals else None
        self.dynamics = nn.Linear(feat, hid) if "dynamics" in config.signals else None
        self.mix = nn.Sequential(nn.GELU(), nn.Linear(2 * hid, hid), nn.GELU(), nn.Linear(hid, 1))

    def forward(self, tokens: torch.Tensor, *descriptors: torch.Tensor, positions: torch.Tensor | None = None,
                live: torch.Tensor | None = None) -> torch.Tensor:
        """`live` (B, N), 1 for the tokens still alive, where a calibration graph keeps dropped tokens in the stream
        (`mask_gradient="full"`): the context is then their mean alone, as it is when the dropped ones are gone."""
        h = self._features(tokens, descriptors[-1], descriptors[-2] if len(descriptors) > 1 else descriptors[-1])
        if live is None:
            context = h.mean(dim=1, keepdim=True)
        else:
            w = live.to(h.dtype).unsqueeze(-1)
            context = (h * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        first, last = self.mix[1], self.mix[3]
        hid = h.shape[-1]
        z = F.linear(F.gelu(h), first.weight[:, :hid]) + F.linear(F.gelu(context), first.weight[:, hid:], first.bias)
        # A one-column GEMM is a library call of its own; as a multiply-reduce Inductor fuses it into the GELU's kernel.
        logits = (F.gelu(z) * last.weight[0]).sum(-1) + last.bias
        if not self.positions:
            return logits
        if positions is None:
            raise ValueError("this predictor has a coverage prior: call it with positions= (the pruning pass does)")
        pos = positions.squeeze(-1)
        # A fused token (`fuse_pruned`) carries a weighted mean of the dropped positions: it reads the nearest one's prior.
        prior = self.prior[pos.round().long().clamp(0, self.prior.numel() - 1)]
        return logits + self.config.coverage * torch.where(pos >= 0, prior, torch.zeros_like(prior))

    def _features(self, tokens: torch.Tensor, last: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        inputs, weights, biases = [], [], []
        if self.embedding is not None:
            inputs.append(self.embedding[0](tokens))
            weights.append(self.embedding[1].weight)
            biases.append(self.embedding[1].bias)
        # W_i·last + W_d·(last - prev) = (W_i + W_d)·last - W_d·prev; with one descriptor, prev = last: no change.
        w_last = [m.weight for m in (self.interaction, self.dynamics) if m is not None]
        if w_last:
            inputs.append(last)
            weights.append(sum(w_last))
            biases += [m.bias for m in (self.interaction, self.dynamics) if m is not None]
        if self.dynamics is not None:
            inputs.append(prev)
            weights.append(-self.dynamics.weight)
        return F.linear(torch.cat(inputs, dim=-1), torch.cat(weights, dim=1), sum(biases))


def make_predictors(structure: ModelStructure, stages: tuple[int, ...], config: PredictorConfig, seed: int = 0) -> dict[int, SpotPredictor]:
    """One predictor per stage, initialised from `seed` alone: torch's global generator is neither read nor moved, so
    the caller's own draws (a calibration's exploration noise) follow its seed, not this one."""
    b = structure.blocks[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {s: SpotPredictor(b.dim, b.heads, config, structure.tokens - structure.num_special)
                for s in stages}
