"""Policy "merge" (ToMe-style merging): the op against a per-image loop, proportional attention against duplicated
tokens, the graph it makes and its outputs against an independent eager implementation, budgets, compile, and the
registry that made adding it one file."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: PLC2701 (counts dynamo frames)

import spot_compile as sc
from spot_compile import policy_configs
from spot_compile.errors import BudgetError, StructureError
from spot_compile.ops.merging import merge_tokens, size_bias
from spot_compile.passes.insert_merging import BIAS_TAG, SIZES_TAG
from spot_compile.policies import DropPolicy, policy_names, register, registry
from spot_compile.policies.merge import MergePolicy

from .conftest import VARIANTS, small_vit
from .model_families import FAMILIES, INPUT_SIZE, build, logits
from .reference import _merge_one, eager_merged


@pytest.mark.parametrize("keep", [5, 7, 10])
def test_merge_tokens_matches_a_per_image_loop(keep):
    torch.manual_seed(0)
    ns, n, d = 2, 13, 8  # 11 patch tokens: set A has 6, set B 5, so at most 6 merges
    x, metric = torch.randn(3, n, d), torch.randn(3, n, 5)
    sizes = torch.cat([torch.ones(3, ns, 1), torch.randint(1, 4, (3, n - ns, 1)).float()], dim=1)
    merged, merged_sizes = merge_tokens(x, sizes, metric, ns, keep)
    assert merged.shape == (3, ns + keep, d) and merged_sizes.shape == (3, ns + keep, 1)
    for b in range(3):
        want_x, want_size = _merge_one(x[b], sizes[b, :, 0], metric[b], ns, keep)
        torch.testing.assert_close(merged[b], want_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged_sizes[b, :, 0], want_size)
    # nothing is lost: sizes add up to the patches, and the size-weighted sum of the tokens is unchanged
    torch.testing.assert_close(merged_sizes[:, ns:].sum((1, 2)), sizes[:, ns:].sum((1, 2)))
    torch.testing.assert_close((merged * merged_sizes).sum(1), (x * sizes).sum(1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(merged[:, :ns], x[:, :ns])  # special tokens untouched


def test_proportional_attention_counts_a_merged_token_as_its_copies():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 3, 8), torch.randn(2, 3, 3, 8)
    # keys/values [t0, t0, t1] seen unmerged equal [t0, t1] with sizes [2, 1]
    dup_k, dup_v = k[:, :, [0, 0, 1]], v[:, :, [0, 0, 1]]
    want = F.scaled_dot_product_attention(q, dup_k, dup_v)
    sizes = torch.tensor([2.0, 1.0, 1.0])[None, :, None].expand(2, -1, -1)[:, :2]
    got = F.scaled_dot_product_attention(q, k[:, :, :2], v[:, :, :2], attn_mask=size_bias(sizes, q))
    torch.testing.assert_close(got, want)
    # (B*H, N, d) layout, batch-major as nn.MultiheadAttention folds it
    q3, k3, v3 = (t.reshape(6, *t.shape[2:]) for t in (q, k[:, :, :2], v[:, :, :2]))
    got3 = F.scaled_dot_product_attention(q3, k3, v3, attn_mask=size_bias(sizes, q3))
    torch.testing.assert_close(got3.reshape(want.shape), want)
    # explicit softmax: the bias added to the logits
    logits = q3 @ k3.transpose(-2, -1) * 8**-0.5
    torch.testing.assert_close(((logits + size_bias(sizes, logits)).softmax(-1) @ v3).reshape(want.shape), want)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_merged_graph_matches_an_eager_implementation(name):
    model = small_vit(**VARIANTS[name])
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="merge"))
    stages, keep = [s.block for s in sparse.plan.stages], [s.keep for s in sparse.plan.stages]
    assert stages == [1, 2, 3] and keep == sorted(keep, reverse=True) and keep[-1] < 64
    nodes = list(sparse.graph_module.graph.nodes)
    merges = [n for n in nodes if n.target is merge_tokens]
    assert len(merges) == 3
    sizes = {n.meta[SIZES_TAG]: n for n in nodes if SIZES_TAG in n.meta}
    biases = {n.meta[BIAS_TAG]: n for n in nodes if BIAS_TAG in n.meta}
    assert sorted(sizes) == stages and sorted(biases) == [1, 2, 3]
    for block, bias in biases.items():  # each block weights keys by the sizes of the latest merge in front of it
        assert bias.args[0] is sizes[max(s for s in stages if s <= block)]
    assert merges[1].args[1] is sizes[1] and merges[0].args[1] is None  # sizes carried from merge to merge
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), eager_merged(model, x, stages, keep), atol=2e-5, rtol=1e-4)


def test_merge_meets_the_budget_equals_the_model_at_one_and_compiles_as_one_graph():
    torch._dynamo.reset()
    model = small_vit()
    x = torch.randn(4, 1, 16, 16)
    dense = sc.sparsify(model, sc.SparsifyConfig(budget=1.0, policy="merge"))
    with torch.no_grad():
        assert torch.equal(dense(x), model(x))
    for budget in (0.8, 0.7, 0.6):
        sparse = sc.sparsify(model, sc.SparsifyConfig(budget=budget, policy="merge"))
        assert budget - 0.02 <= sparse.plan.flops_ratio <= budget
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(sparse.graph_module, fullgraph=True, backend=counter)
    with torch.no_grad():
        first = compiled(x)
        for _ in range(3):
            compiled(torch.randn(4, 1, 16, 16))
        torch.testing.assert_close(first, sparse(x), atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1


@pytest.mark.parametrize("patch,stages", [(196, 5), (64, 3), (16, 2)])
def test_merge_schedule_is_tomes_constant_one_then_decreases_to_halving(patch, stages):
    """Above rho 0.5 the schedule is ToMe's constant r (the last stage's count falls evenly), below it slides to
    halving at every stage; every count is monotone in rho, as the budget search needs, and no stage merges more
    than half of what enters it."""
    policy = MergePolicy.__new__(MergePolicy)  # the schedule reads no model
    grid = [policy.schedule(patch, stages, i / 400) for i in range(401)]
    for lower, upper in zip(grid, grid[1:]):
        assert all(a <= b for a, b in zip(lower, upper))
    for keep in grid:
        prev = patch
        for k in keep:
            assert prev // 2 <= k <= prev
            prev = k
    assert grid[-1] == (patch,) * stages
    halving = [patch // 2 ** s for s in range(1, stages + 1)]
    assert list(grid[0]) == halving
    r = patch / (2 * stages)  # rho 0.75: the constant schedule at ToMe's rho 0.5
    constant = policy.schedule(patch, stages, 0.75)
    assert all(abs(k - (patch - s * r)) <= 1 or k == prev // 2 for s, (k, prev) in enumerate(zip(constant, (patch, *constant)), 1))


def test_merge_reaches_budgets_below_the_constant_schedule():
    """ToMe's constant r bottoms out where the last stage halves; budgets below that are met front-loaded."""
    model = small_vit(depth=6)
    patch, stages = 64, (1, 2, 3, 4, 5)
    floor = MergePolicy.__new__(MergePolicy).schedule(patch, len(stages), 0.5)  # the constant schedule's fewest tokens
    floor_ratio = sc.sparsify(model, sc.SparsifyConfig(policy="merge", stages=stages, keep=floor)).plan.flops_ratio
    budget = round(floor_ratio - 0.08, 2)
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=budget, policy="merge"))
    assert budget - 0.02 <= sparse.plan.flops_ratio <= budget
    assert sparse.plan.stages[0].keep < floor[0]  # more merged early than a constant r can
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), eager_merged(model, x, list(stages), [s.keep for s in sparse.plan.stages]),
                                   atol=2e-5, rtol=1e-4)


def test_merge_refuses_what_it_cannot_do_in_one_line():
    model = small_vit()
    with pytest.raises(BudgetError, match="fuse_pruned .* applies to policies that drop tokens, not to 'merge'"):
        sc.SparsifyConfig(policy="merge", fuse_pruned=True)
    with pytest.raises(StructureError, match="merging can keep 32..64 of 64 tokens"):  # more than one merge per token
        sc.sparsify(model, sc.SparsifyConfig(policy="merge", stages=(1,), keep=(20,)))
    with pytest.raises(BudgetError, match=r"fewest tokens this policy keeps there \(32\) still cost"):
        sc.sparsify(model, sc.SparsifyConfig(policy="merge", stages=(3,), budget=0.5))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_merge_on_every_model_family(name):
    model = build(name)
    x = torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE)
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, input_size=INPUT_SIZE, policy="merge"))
    assert 0.58 <= sparse.plan.flops_ratio <= 0.6
    with torch.no_grad():
        out = logits(sparse(x))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if name.startswith(("hand-written explicit", "torchvision")):  # compile the explicit and the MultiheadAttention forms (sdpa: above)
        torch._dynamo.reset()
        with torch.no_grad():
            torch.testing.assert_close(logits(sparse.compiled(verify=False, batch=2)(x)), out, atol=1e-4, rtol=1e-4)


def test_a_policy_is_one_class_in_the_registry(monkeypatch):
    """What a plug-in writes: a scorer policy that keeps the first patch tokens, usable by name at once."""
    monkeypatch.setattr(registry, "_POLICIES", dict(registry._POLICIES))
    monkeypatch.setattr(policy_configs, "_CONFIGS", dict(policy_configs._CONFIGS))

    class FirstTokens(torch.nn.Module):
        attention, history = "none", 0

        def forward(self, tokens):
            return -torch.arange(tokens.shape[1], dtype=tokens.dtype).expand(tokens.shape[0], -1)

    @register
    class FirstTokensPolicy(DropPolicy):
        name = "first-tokens"
        summary = "keep the first patch tokens (a test plug-in)"

        def scorer(self, stage):
            return FirstTokens()

    assert "first-tokens" in policy_names()
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="first-tokens"))
    assert 0.58 <= sparse.plan.flops_ratio <= 0.6
    from spot_compile.cli.visualize import kept_patches

    maps = kept_patches(sparse, torch.randn(2, 1, 16, 16))
    for stage, alive in zip(sparse.plan.stages, maps):
        assert alive[:, : stage.keep].all() and not alive[:, stage.keep :].any()
    with pytest.raises(ValueError, match="registered already"):
        register(type("Other", (FirstTokensPolicy,), {}))


def test_a_merged_model_saves_and_loads(tmp_path):
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.7, policy="merge"))
    sc.save(sparse, model, tmp_path / "merged.pt")
    loaded = sc.load(tmp_path / "merged.pt", model)
    assert loaded.plan.stages == sparse.plan.stages and loaded.config.policy == "merge"
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x))
