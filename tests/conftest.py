import pytest
import torch

from spot_compile.models.vit import ViT

# Small variants of the built-in ViT, covering the graph shapes the finder must handle.
VARIANTS = {
    "sdpa-fused-pre": dict(),
    "explicit-separate-pre": dict(attention="explicit", qkv="separate"),
    "sdpa-separate-post": dict(qkv="separate", norm="post"),
    "explicit-fused-post": dict(attention="explicit", norm="post"),
    "avgpool-registers": dict(pool="avg", num_registers=2),
    "conv-stem": dict(stem_channels=8),
}
SMALL = dict(img_size=16, patch_size=2, dim=32, depth=4, heads=2)  # 64 patch tokens


def small_vit(**overrides) -> ViT:
    torch.manual_seed(0)
    return ViT(**{**SMALL, **overrides}).eval()


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request):
    return request.param, small_vit(**VARIANTS[request.param])


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 1, 16, 16)


def calibration_and_pruned_graphs(model, stages, keep, predictors, mask_gradient=None):
    """(calibration graph in eval mode, its SoftKeep modules, the pruned inference graph) for the same predictors."""
    import spot_compile as sc
    from spot_compile.graph.capture import capture
    from spot_compile.graph.inputs import example_input
    from spot_compile.passes.soft_pruning import MASK_GRADIENTS, build_calibration_graph

    mask_gradient = mask_gradient or MASK_GRADIENTS[0]
    captured = capture(model, example_input(model, None))
    sparse = sc.sparsify(model, sc.SparsifyConfig(keep=keep, stages=stages, policy=sc.GivenScorersConfig(predictors)))
    student, keepers = build_calibration_graph(captured, stages, keep, predictors, mask_gradient=mask_gradient)
    student.eval()
    for k in keepers.values():
        k.eval()
    return student, keepers, sparse
