import pytest
import torch

from spot_compile import ops
from spot_compile.errors import StructureError
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.passes.emit import SPOT_TAG
from spot_compile.passes.insert_pruning import insert_pruning
from spot_compile.passes.pipeline import StagePass
from spot_compile.planning.build import build_sparse
from spot_compile.scorers.training_free import ClassAttentionScorer

from .reference import eager_pruned


def _class_attention_pruning(structure):
    def stage_pass(st, block, keep):
        return StagePass(lambda gm: insert_pruning(gm, st, block, keep, ClassAttentionScorer(structure.has_class_token)), st, block, "prune")

    return stage_pass


def _build(model, stages, keep):
    captured = capture(model, example_input(model, None))
    structure = find_blocks(captured)
    return build_sparse(captured, stages, keep, _class_attention_pruning(structure))


def test_keeping_every_token_reproduces_the_model(variant, images):
    _, model = variant
    gm, structure = _build(model, (1, 2), (64, 64))
    with torch.no_grad():
        torch.testing.assert_close(gm(images), model(images), atol=1e-5, rtol=1e-5)


def test_pruned_graph_matches_eager_pruning(variant, images):
    _, model = variant
    stages, keep = (1, 3), (40, 17)
    gm, _ = _build(model, stages, keep)
    prunes = [n for n in gm.graph.nodes if n.target is ops.prune_tokens]
    assert [n.args[3] for n in prunes] == list(keep)
    assert all(SPOT_TAG in n.meta for n in prunes)
    # every node after the last prune that carries a token axis now has 17 + special tokens
    special = prunes[0].args[2]
    assert tuple(prunes[-1].meta["val"].shape[1:]) == (17 + special, model.cfg.dim)
    with torch.no_grad():
        expected = eager_pruned(model, images, list(stages), list(keep))
        torch.testing.assert_close(gm(images), expected, atol=1e-5, rtol=1e-5)
        # batch size is dynamic: a different batch goes through the same graph
        assert gm(torch.randn(5, 1, 16, 16)).shape == (5, 10)


def test_reshape_sizes_are_rewritten_not_left_stale(images):
    from .conftest import small_vit

    model = small_vit()
    gm, _ = _build(model, (2,), (20,))
    reshapes = [n for n in gm.graph.nodes if n.target == torch.ops.aten.reshape.default]
    later = reshapes[len(reshapes) // 2 :]
    assert later and all(65 not in n.args[1] for n in later)
    assert any(21 in n.args[1] for n in later)


def test_fused_token_is_the_weighted_mean_of_dropped_tokens():
    torch.manual_seed(0)
    x, scores = torch.randn(2, 6, 4), torch.randn(2, 6)
    out = ops.prune_tokens(x, scores, num_special=1, keep=2, fuse=True)
    assert out.shape == (2, 4, 4)
    for b in range(2):
        rest = scores[b, 1:]
        kept = rest.topk(2).indices.sort().values
        dropped = [i for i in range(5) if i not in kept.tolist()]
        w = rest[dropped].softmax(0)
        torch.testing.assert_close(out[b, 3], (w[:, None] * x[b, 1:][dropped]).sum(0))
        torch.testing.assert_close(out[b, 1:3], x[b, 1:][kept])
        torch.testing.assert_close(out[b, 0], x[b, 0])


def test_stage_out_of_range_is_refused():
    from .conftest import small_vit

    with pytest.raises(StructureError, match="out of range"):
        _build(small_vit(), (4,), (10,))


def test_kept_token_maps_follow_the_stages():
    import spot_compile as sc
    from spot_compile.cli.visualize import kept_patches

    from .conftest import small_vit

    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(keep=(40, 17), stages=(1, 3), policy="class-attention"))
    maps = kept_patches(sparse, torch.randn(2, 1, 16, 16))
    assert [m.shape for m in maps] == [(2, 64), (2, 64)]
    assert maps[0].sum(1).tolist() == [40, 40] and maps[1].sum(1).tolist() == [17, 17]
    assert bool((maps[1] <= maps[0]).all())  # a token dropped once stays dropped


def test_a_propagation_that_pins_the_batch_is_refused():
    """torch 2.11's C++ matmul, run on fake tensors outside the Python dispatcher, guarded the batch to the
    example's 2, and every later reshape then read [2, ...]. The same guard, forced here, must be refused."""
    from .conftest import small_vit

    model = small_vit()
    captured = capture(model, example_input(model, None))
    structure = find_blocks(captured)
    fine, _ = build_sparse(captured, (2,), (20,), _class_attention_pruning(structure))
    assert fine(torch.randn(3, 1, 16, 16)).shape == (3, 10)  # the normal build keeps the batch dynamic
    batch = next(n for n in captured.graph.nodes if n.op == "placeholder").meta["val"].shape[0]
    assert int(batch) == 2  # int() on a symbolic size guards it to its hint, as the C++ matmul did
    with pytest.raises(StructureError, match="pinned the dynamic batch size to 2"):
        build_sparse(captured, (2,), (20,), _class_attention_pruning(structure))
