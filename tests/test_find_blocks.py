import pytest
import torch
from torch import nn

from spot_compile.errors import StructureError
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.graph.query import SDPA_OPS, SOFTMAX_OPS


def test_finds_every_block_with_its_parts(variant):
    name, model = variant
    structure = find_blocks(capture(model, example_input(model, None)))
    cfg = model.cfg
    assert len(structure.blocks) == cfg.depth
    expected_special = (1 if cfg.pool == "cls" else 0) + cfg.num_registers
    assert structure.num_special == expected_special
    for i, b in enumerate(structure.blocks):
        assert b.index == i
        assert (b.tokens, b.dim, b.heads) == (64 + expected_special, cfg.dim, cfg.heads)
        assert b.kind == ("explicit" if cfg.attention == "explicit" else "sdpa")
        assert b.attention.target in (SOFTMAX_OPS if b.kind == "explicit" else SDPA_OPS)
        # the attention residual adds the block input to something computed from the attention
        assert b.input in b.attn_residual.args and b.mlp_residual is not None
    # consecutive blocks are chained: block i+1 starts from what block i produced
    for prev, nxt in zip(structure.blocks, structure.blocks[1:]):
        assert prev.mlp_residual is nxt.input or prev.mlp_residual in nxt.input.all_input_nodes


def test_cnn_is_refused_with_a_clear_error():
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)).eval()
    with pytest.raises(StructureError, match="no attention found"):
        find_blocks(capture(cnn, torch.randn(2, 1, 16, 16)))


class WindowedViT(nn.Module):
    """Swin-like: attention runs inside 2x2 windows of tokens, not over the whole sequence."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 16, 4, 4)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 16): a 4x4 grid
        b, n, c = x.shape
        w = x.reshape(b, 2, 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 4, c)
        q, k, v = self.qkv(w).chunk(3, dim=-1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        a = a.reshape(b, 2, 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n, c)
        x = x + self.proj(a)
        return self.head(x.mean(1))


def test_windowed_attention_is_refused():
    with pytest.raises(StructureError, match="windowed"):
        find_blocks(capture(WindowedViT().eval(), torch.randn(2, 1, 16, 16)))


class EncoderDecoder(nn.Module):
    """A DETR-like model: a ViT encoder, then learned queries that cross-attend to the encoder's tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 16, 4, 4)
        enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(enc, 2, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, 2)
        self.queries = nn.Parameter(torch.randn(1, 5, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        memory = self.encoder(self.embed(x).flatten(2).transpose(1, 2))
        out = self.decoder(self.queries.expand(x.shape[0], -1, -1), memory)
        return self.head(out.mean(1))


def test_encoder_decoder_is_refused_at_its_cross_attention():
    with pytest.raises(StructureError, match="cross-attention, as in an encoder-decoder"):
        find_blocks(capture(EncoderDecoder().eval(), torch.randn(2, 1, 16, 16)))
