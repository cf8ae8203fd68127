"""passes/trivial_masks.py: masks that mask nothing are removed; real masks are kept."""

import pytest
import torch
from torch import nn

from spot_compile.graph.capture import capture
from spot_compile.graph.query import SDPA_OPS


class MaskedAttention(nn.Module):
    """One ViT block whose attention gets a mask built, as transformers 5 does, from arange and the batch size."""

    def __init__(self, mask: str, explicit: bool):
        super().__init__()
        self.mask, self.explicit = mask, explicit
        self.embed = nn.Conv2d(1, 16, 4, 4)
        self.qkv, self.head = nn.Linear(16, 48), nn.Linear(16, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        idx = torch.arange(n)
        allowed = (idx[None, :] >= 0) if self.mask == "trivial" else (idx[None, :] <= idx[:, None])  # causal masks something
        allowed = allowed[None, None].expand(b, 1, n, n)
        q, k, v = (t.unsqueeze(1) for t in self.qkv(x).chunk(3, dim=-1))
        if self.explicit:
            additive = torch.zeros(b, 1, n, n).masked_fill(~allowed, float("-inf"))
            a = ((q @ k.transpose(-1, -2)) * 0.25 + additive).softmax(-1) @ v
        else:
            a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + a.squeeze(1)
        return self.head(x.mean(1))


def _masks(gm):
    found = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in SDPA_OPS:
            found.append(n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None))
        if n.op == "call_function" and n.target is torch.ops.aten.masked_fill.Scalar:
            found.append(n)
    return [m for m in found if m is not None]


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("mask", ["trivial", "causal"])
def test_trivial_masks_go_and_real_masks_stay(mask, explicit):
    torch.manual_seed(0)
    model = MaskedAttention(mask, explicit).eval()
    x = torch.randn(3, 1, 16, 16)
    gm = capture(model, x)
    assert bool(_masks(gm)) == (mask == "causal")
    has_arange = any(n.target is torch.ops.aten.arange.default for n in gm.graph.nodes if n.op == "call_function")
    assert has_arange == (mask == "causal")  # a removed mask leaves none of its producers behind
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(gm(x[:1]), model(x[:1]), atol=1e-6, rtol=1e-6)
