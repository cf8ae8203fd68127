import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import spot_compile as sc
from spot_compile.errors import BudgetError
from spot_compile.measure.flops import count_flops
from spot_compile.planning.budget import keep_schedule, schedule_cost, solve_keep

from .conftest import small_vit


def _math_flops(module, x):
    """An independent count: the MATH backend runs attention as plain matmuls, which torch counts itself."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def test_cpu_fused_attention_is_counted():
    model = small_vit()
    x = torch.randn(1, 1, 16, 16)
    assert count_flops(model, x) == _math_flops(model, x) > 0


@pytest.mark.parametrize("budget", [0.8, 0.6, 0.5])
def test_budget_is_met_within_two_percent(budget):
    model = small_vit(depth=6, img_size=24)  # 144 patch tokens
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=budget))
    x = torch.randn(1, 1, 24, 24)
    measured = _math_flops(sparse, x) / _math_flops(model, x)
    assert budget - 0.02 <= measured <= budget
    assert sparse.plan.flops_ratio == pytest.approx(measured, abs=1e-9)
    kept = [s.tokens_out for s in sparse.plan.stages]
    assert kept == sorted(kept, reverse=True) and kept[-1] < 145


def test_budget_one_is_the_dense_model_exactly(images):
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=1.0))
    assert sparse.plan.stages == [] and sparse.plan.flops_ratio == 1.0
    with torch.no_grad():
        torch.testing.assert_close(sparse(images), model(images), atol=1e-5, rtol=1e-5)


def test_weights_are_shared_not_copied():
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.7))
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in sparse.graph_module.parameters()} <= ptrs


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, "abc"])
def test_budget_out_of_range(budget):
    with pytest.raises(BudgetError, match="budget"):
        sc.SparsifyConfig(budget=budget)


def test_unreachable_budget_names_the_minimum():
    with pytest.raises(BudgetError, match="unreachable"):
        sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.05, stages=(3,)))


def _block_tokens(patch, stages, depth, keep):
    """Tokens (class token included) each block of a synthetic ViT runs on under `keep`."""
    blocks = zip(stages, (*stages[1:], depth), keep)
    return [1 + patch] * stages[0] + [n for s, b, k in blocks for n in [1 + k] * (b - s)]


@pytest.mark.parametrize("budget", [0.8, 0.6, 0.5, 0.35])
def test_budget_search_counts_few_schedules_and_returns_a_counted_one(budget):
    """The search's estimate only steers it: here the true cost differs from the estimate (MLP ratio 2, a fixed part,
    a scorer costing FLOPs per stage), and the search must still land in the band after few counts."""
    stages, depth, dim, patch = (2, 4, 6), 8, 48, 144
    counted = []

    def true_flops(keep):
        counted.append(keep)
        return 10**7 + sum(16 * dim * dim * n + 4 * dim * n * n for n in _block_tokens(patch, stages, depth, keep)) + 5000 * sum(keep)

    dense = true_flops((patch,) * 3)
    counted.clear()
    keep = solve_keep(true_flops, dense, lambda rho: keep_schedule(patch, 3, rho, False), budget, 0.02, schedule_cost(stages, depth, dim, 1, False))
    ratio = true_flops(keep) / dense
    assert budget - 0.005 <= ratio <= budget
    assert keep in counted[:-1] and len(counted) - 1 <= 5  # the last call is this test's own
    assert keep[0] >= keep[1] >= keep[2]


@pytest.mark.parametrize("patch, stages, depth, budget", [
    (7, (1, 2), 4, 0.7), (16, (2, 4, 6), 8, 0.6), (26, (1, 2, 3), 4, 0.6), (35, (1, 2), 4, 0.6), (8, (1, 2), 4, 0.95),
])
def test_budget_search_on_coarse_schedules_finds_the_best_one_under_budget(patch, stages, depth, budget):
    """With few tokens, schedules jump and the band may hold none: the search must still return the costliest
    schedule under the budget (checked against every schedule), not give up at a bracket end."""
    dim = 32

    def flops(keep):
        return 10**5 + sum(16 * dim * dim * n + 4 * dim * n * n for n in _block_tokens(patch, stages, depth, keep))

    n = len(stages)
    dense = flops((patch,) * n)
    every = {keep_schedule(patch, n, r / 2000, False) for r in range(2001)}
    best = max(flops(k) / dense for k in every if flops(k) / dense <= budget)
    keep = solve_keep(flops, dense, lambda rho: keep_schedule(patch, n, rho, False), budget, 0.02, schedule_cost(stages, depth, dim, 1, False))
    assert best >= flops(keep) / dense >= min(best, budget - 0.005)


def test_stage_index_out_of_range():
    with pytest.raises(BudgetError, match="out of range"):
        sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.6, stages=(0, 2)))


def test_explicit_keep_counts_override_the_budget():
    sparse = sc.sparsify(small_vit(), sc.SparsifyConfig(keep=(30, 10), stages=(1, 2), policy="class-attention"))
    assert [s.tokens_out for s in sparse.plan.stages] == [31, 11]


def test_flops_off_the_cpu_count_attention_under_the_math_backend():
    """Off the CPU (on a GPU; here the meta device) the fused kernel SDPA picks depends on the build, so attention is
    counted under the MATH backend: the fused backends are off while counting, and the total is the CPU's."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cuda.flash_sdp_enabled())
            return x * 2

    count_flops(Probe(), torch.randn(2, 3))
    count_flops(Probe(), torch.randn(2, 3, device="meta"))
    assert seen == [True, False]
    model, x = small_vit(), torch.randn(2, 1, 16, 16)
    assert count_flops(model.to("meta"), x.to("meta")) == count_flops(small_vit(), x) > 0


@pytest.mark.parametrize("policy", ["merge", "class-attention"])
def test_sparsify_leaves_the_callers_random_stream_where_it_was(policy):
    # A calibration sparsifies once per budget it needs; the steps after must draw what they would without it.
    model = small_vit(depth=6, img_size=24)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy=policy))
    assert torch.equal(torch.rand(4), expected)
    assert torch.equal(sparse.example(2), sparse.example(2))  # the example comes from its own generator
