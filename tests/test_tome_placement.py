"""`MergeConfig(merge_at="attention")`: ToMe exactly as published (merged inside each block, between attention and MLP,
on that block's keys, over all tokens with the class and distillation tokens protected), checked against a
restatement of the published code (tests/reference.py) on timm models."""

import pytest
import torch

import spot_compile as sc
from spot_compile.errors import StructureError
from spot_compile.ops.merging import tome_merge

from .conftest import small_vit
from .reference import tome_published_logits, tome_published_merge

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("class_token, distill_token", [(True, False), (True, True), (False, False)])
def test_the_merge_op_is_tomes(class_token, distill_token):
    torch.manual_seed(0)
    x, metric = torch.randn(2, 21, 8), torch.randn(2, 21, 6)
    size = torch.randint(1, 5, (2, 21, 1)).float()
    for r in (1, 4, 9):
        want, want_size = tome_published_merge(x, size, metric.clone(), r, class_token, distill_token)
        got, got_size = tome_merge(x, size, metric, class_token, distill_token, 21 - r)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_size, want_size)


MODELS = {
    "deit_tiny": dict(name="deit_tiny_patch16_224"),
    "deit_tiny_distilled": dict(name="deit_tiny_distilled_patch16_224"),
    "vit_avg_pool": dict(name="vit_tiny_patch16_224", class_token=False, global_pool="avg"),
}


@pytest.mark.parametrize("family", MODELS)
def test_the_graph_gives_tomes_logits_on_timm_models(family):
    kwargs = dict(MODELS[family])
    torch.manual_seed(0)
    model = timm.create_model(kwargs.pop("name"), pretrained=False, img_size=96, **kwargs).eval()
    depth, r = len(model.blocks), 2
    patches = 36
    keep = tuple(patches - r * (i + 1) for i in range(depth))
    sparse = sc.sparsify(model, sc.SparsifyConfig(keep=keep, stages=tuple(range(depth)), policy=sc.MergeConfig(merge_at="attention")))
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        got = sparse(x)
    want = tome_published_logits(model, x, [r] * depth)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert sparse.plan.stages[-1].tokens_out == patches - r * depth + sparse.structure.num_special


def test_inside_the_block_the_mlp_runs_on_fewer_tokens_at_the_same_merges_and_the_budget_is_met():
    # The same merges: in front of blocks 1, 2, 3, or inside blocks 0, 1, 2 after their attention; inside, each of
    # those blocks' MLP already runs on the merged tokens.
    model = small_vit()
    keep = (50, 36, 22)
    at_block = sc.sparsify(model, sc.SparsifyConfig(keep=keep, stages=(1, 2, 3), policy="merge"))
    at_attention = sc.sparsify(model, sc.SparsifyConfig(keep=keep, stages=(0, 1, 2), policy=sc.MergeConfig(merge_at="attention")))
    assert at_attention.plan.sparse_flops < at_block.plan.sparse_flops
    budgeted = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy=sc.MergeConfig(merge_at="attention")))
    assert [s.block for s in budgeted.plan.stages] == [0, 1, 2, 3]  # every block, the first included, as ToMe
    assert 0.58 <= budgeted.plan.flops_ratio <= 0.6
    x = torch.randn(2, 1, 16, 16)
    compiled = torch.compile(budgeted.graph_module, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), budgeted(x), atol=1e-5, rtol=1e-4)
    dense = sc.sparsify(model, sc.SparsifyConfig(budget=1.0, policy=sc.MergeConfig(merge_at="attention")))
    with torch.no_grad():
        assert torch.equal(dense(x), model(x))


def test_special_tokens_tome_does_not_know_are_refused_in_one_line():
    model = small_vit(num_registers=2)
    with pytest.raises(StructureError, match=r"model has 3 special tokens \(registers\?\): use merge_at='block'"):
        sc.sparsify(model, sc.SparsifyConfig(budget=0.7, policy=sc.MergeConfig(merge_at="attention")))
    with pytest.raises(sc.SpotError, match="merge_at must be one of block, attention"):
        sc.MergeConfig(merge_at="mlp")


def test_the_cli_places_merging_with_merge_at(tmp_path):
    from click.testing import CliRunner

    from spot_compile.cli.main import main

    from .test_cli import MODEL_FILE, _write

    path = _write(tmp_path, MODEL_FILE)
    result = CliRunner().invoke(main, ["apply", path, "--merge-at", "attention", "--no-latency"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "in block (after attention)" in result.output
    refused = CliRunner().invoke(main, ["apply", path, "--merge-at", "attention", "--policy", "random"])
    assert refused.exit_code == 2 and "policy 'random' does not merge" in refused.output


def test_tomes_placement_never_merges_more_than_half_the_patch_tokens_a_block_holds():
    from spot_compile.policies.merge import MergePolicy

    policy = MergePolicy.__new__(MergePolicy)
    policy.in_block = True
    for patches, stages in ((197 - 1, 12), (65 - 1, 4), (35, 3)):
        for rho in (0.0, 0.2, 0.5, 0.8, 1.0):
            prev = patches
            for k in policy.schedule(patches, stages, rho):
                assert prev - prev // 2 <= k <= prev  # ToMe's matching merges floor(n / 2) at most
                prev = k
