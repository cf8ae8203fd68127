"""Real model libraries (random init, built small): budget 1.0 equals dense, 0.6 meets the FLOPs budget."""

import pytest
import torch

import spot_compile as sc


def _timm(name, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, depth=4, img_size=64, num_classes=10, **kw)


def _torchvision():
    tv = pytest.importorskip("torchvision")
    return tv.models.VisionTransformer(image_size=64, patch_size=8, num_layers=4, num_heads=3, hidden_dim=48, mlp_dim=96, num_classes=10)


MODELS = {
    "timm vit_tiny_patch16_224": lambda: _timm("vit_tiny_patch16_224", patch_size=4),
    "timm deit_tiny_patch16_224": lambda: _timm("deit_tiny_patch16_224", patch_size=4),
    "torchvision VisionTransformer": _torchvision,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_library_vit(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(2, 3, 64, 64)
    dense = sc.sparsify(model, sc.SparsifyConfig(budget=1.0, input_size=64))
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, input_size=64, stages=(1, 2, 3)))
    assert 0.58 <= sparse.plan.flops_ratio <= 0.6
    with torch.no_grad():
        assert sparse(x).shape == (2, 10)
