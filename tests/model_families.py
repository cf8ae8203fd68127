"""Small, randomly initialised ViTs from each model library a user may bring (shared by the tests and
benchmarks/model_coverage.py). Every builder returns a model in eval mode for 64x64 RGB input."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from spot_compile.models.vit import ViT

INPUT_SIZE = 64


def _timm(name: str, **kw) -> torch.nn.Module:
    timm = pytest.importorskip("timm")
    kw = {"depth": 4, "img_size": INPUT_SIZE, "num_classes": 10, "patch_size": 8, **kw}
    return timm.create_model(name, pretrained=False, **kw)


def _timm_small(**kw) -> torch.nn.Module:
    return _timm("vit_small_patch16_224", embed_dim=48, num_heads=3, **kw)


def _torchvision() -> torch.nn.Module:
    tv = pytest.importorskip("torchvision")
    return tv.models.VisionTransformer(image_size=INPUT_SIZE, patch_size=8, num_layers=4, num_heads=3, hidden_dim=48,
                                       mlp_dim=96, num_classes=10)


def _hf(kind: str, attention: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {
        "vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
        "deit": (transformers.DeiTConfig, transformers.DeiTForImageClassificationWithTeacher),
    }[kind]
    config = config_cls(image_size=INPUT_SIZE, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
                        intermediate_size=96, num_labels=10, attn_implementation=attention)
    return model_cls(config)


def _hand_written(**kw) -> torch.nn.Module:
    return ViT(img_size=INPUT_SIZE, patch_size=8, in_chans=3, dim=48, depth=4, heads=3, **kw)


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "hf ViTForImageClassification (sdpa)": lambda: _hf("vit", "sdpa"),
    "hf ViTForImageClassification (eager)": lambda: _hf("vit", "eager"),
    "hf DeiTForImageClassificationWithTeacher (sdpa)": lambda: _hf("deit", "sdpa"),
    "hf DeiTForImageClassificationWithTeacher (eager)": lambda: _hf("deit", "eager"),
    "torchvision VisionTransformer": _torchvision,
    "timm vit_tiny_patch16_224": lambda: _timm("vit_tiny_patch16_224"),
    "timm deit_tiny_patch16_224": lambda: _timm("deit_tiny_patch16_224"),
    "timm deit_tiny_distilled_patch16_224": lambda: _timm("deit_tiny_distilled_patch16_224"),
    "timm vit reg_tokens=4": lambda: _timm_small(reg_tokens=4),
    "timm vit global_pool=avg, no class token": lambda: _timm_small(global_pool="avg", class_token=False),
    "timm vit no_embed_class": lambda: _timm_small(no_embed_class=True),
    "timm vit dynamic_img_size": lambda: _timm_small(dynamic_img_size=True),
    "hand-written sdpa, fused qkv, pre-norm": lambda: _hand_written(),
    "hand-written explicit softmax, separate qkv, post-norm": lambda: _hand_written(attention="explicit", qkv="separate", norm="post"),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name]().eval()


def logits(output) -> torch.Tensor:
    """HF models return a ModelOutput; the others a tensor."""
    return output if isinstance(output, torch.Tensor) else output.logits
