"""A small, hand-written Vision Transformer: the built-in default model and the test bed.

Its knobs cover the variants the structural finder must handle (fused or separate q/k/v, fused SDPA or an
explicit matmul -> softmax -> matmul, pre- or post-norm, class token or average pooling, register tokens, a plain
patchify or a small convolutional stem), so tests exercise those graph shapes without depending on any model library.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from spot_compile.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 28
    patch_size: int = 2
    in_chans: int = 1
    num_classes: int = 10
    dim: int = 96
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    attention: Literal["sdpa", "explicit"] = "sdpa"
    qkv: Literal["fused", "separate"] = "fused"
    norm: Literal["pre", "post"] = "pre"
    pool: Literal["cls", "avg"] = "cls"
    num_registers: int = 0
    # 0: the plain patchify convolution. >0: a 3x3 convolution with this many channels and a GELU in front of it,
    # so each token starts from local features instead of its raw pixels (Xiao et al. 2021, "Early convolutions
    # help transformers see better"); see recipes/train_dense.py for what it bought the shipped model.
    stem_channels: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.explicit = cfg.attention == "explicit"
        self.fused = cfg.qkv == "fused"
        if self.fused:
            self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        else:
            self.q = nn.Linear(cfg.dim, cfg.dim)
            self.k = nn.Linear(cfg.dim, cfg.dim)
            self.v = nn.Linear(cfg.dim, cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if self.fused:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                lin(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v)
            )
        if self.explicit:
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class ViT(nn.Module):
    """Patch embedding, optional class/register tokens, `depth` blocks, a linear head."""

    def __init__(self, cfg: ViTConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = ViTConfig(**{**(cfg.to_dict() if cfg else {}), **overrides})
        self.cfg = cfg
        self.img_size = cfg.img_size
        self.in_chans = cfg.in_chans
        num_patches = (cfg.img_size // cfg.patch_size) ** 2
        patchify = nn.Conv2d(cfg.stem_channels or cfg.in_chans, cfg.dim, cfg.patch_size, cfg.patch_size)
        if cfg.stem_channels:
            self.patch_embed = nn.Sequential(nn.Conv2d(cfg.in_chans, cfg.stem_channels, 3, padding=1), nn.GELU(), patchify)
        else:
            self.patch_embed = patchify
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim)) if cfg.num_registers else None
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim) if cfg.norm == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @property
    def pretrained_cfg(self) -> dict:
        """The input statistics the model expects, declared as timm declares them (read by
        `spot_compile.preprocessing`): Fashion-MNIST's, on which spot-compile trains its models, with the whole image
        as input (no crop) and its recipes' augmentation (`train_augment`, spot-compile's key)."""
        c = self.cfg.in_chans
        return {"mean": (FMNIST_MEAN,) * c, "std": (FMNIST_STD,) * c, "input_size": (c, self.cfg.img_size, self.cfg.img_size),
                "crop_pct": 1.0, "interpolation": "bilinear", "train_augment": "shift-flip"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.registers) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        x = self.norm(self.blocks(x))
        if self.cls_token is not None:
            return self.head(x[:, 0])
        return self.head(x[:, (self.registers.shape[1] if self.registers is not None else 0):].mean(dim=1))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
