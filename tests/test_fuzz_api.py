"""Random (seeded) calls of the public API across a few tiny ViTs: each call either succeeds with a FLOPs ratio that
meets the budget and outputs of the right shape (equal to the model's at budget 1.0), or raises a `SpotError`; any
other exception is a bug. The draws mix valid settings with out-of-range ones (stages past the depth, keep counts
above the token count, input sizes the model rejects, odd types), as a user's typos would."""

import random

import pytest
import torch

import spot_compile as sc

from .conftest import small_vit

MODELS = {
    "sdpa-fused-pre": dict(),
    "explicit-separate-post": dict(attention="explicit", qkv="separate", norm="post"),
    "avgpool-registers": dict(pool="avg", num_registers=2),
    "wide-patches": dict(patch_size=4, depth=3),  # 16 patch tokens: coarse schedules
}
CASES = 40


def _draw(rng: random.Random) -> tuple[str, dict, int]:
    """Two draws in three are settings a careful user would pick (which must then succeed, budget met); the rest mix
    in typos and out-of-range values (which must be refused with a SpotError, or succeed correctly)."""
    name = rng.choice(list(MODELS))
    depth = MODELS[name].get("depth", 4)
    careful = rng.random() < 2 / 3
    kw: dict = {"budget": rng.choice([1.0, 0.8, 0.6, 0.5, 0.4, round(rng.uniform(0.35, 1.0), 3)])}
    kw["policy"] = rng.choice(["class-attention", "random"])
    kw["fuse_pruned"] = rng.random() < 0.3
    if rng.random() < 0.5:
        kw["stages"] = tuple(sorted(rng.sample(range(1, depth), rng.randint(1, depth - 1))))
    if rng.random() < 0.3:
        kw["input_size"] = rng.choice([16, (16, 16), 16.0])
    if careful:
        return name, kw, rng.choice([1, 3])
    typo = rng.choice(["budget", "stages", "keep", "policy", "input_size"])
    if typo == "budget":
        kw["budget"] = rng.choice([0.0, -0.5, 1.2, 0.05, float("nan"), "lots", None])
    elif typo == "stages":
        kw["stages"] = rng.choice([(0,), (depth,), (-1, 2), (1, 9), "3,6", [1.5], (), (True,)])
    elif typo == "keep":
        kw["keep"] = tuple(rng.choice([1, 5, 20, 40, 64, 65, 200, 0, -3]) for _ in range(rng.randint(1, 3)))
    elif typo == "policy":
        kw["policy"] = rng.choice(["spot", "merge", "Class-Attention", ""])
    else:
        kw["input_size"] = rng.choice([12, 20, 0, -4, "16", (16, 16, 16), 2.5])
    return name, kw, rng.choice([1, 3])


@pytest.fixture(scope="module")
def models():
    return {name: small_vit(**overrides) for name, overrides in MODELS.items()}


@pytest.mark.parametrize("seed", range(CASES))
def test_random_api_calls_succeed_correctly_or_raise_spot_error(models, seed):
    name, kw, batch = _draw(random.Random(seed))
    model = models[name]
    try:
        config = sc.SparsifyConfig(**kw)
        sparse = sc.sparsify(model, config)
    except sc.SpotError as e:
        assert str(e) and "\n" not in str(e), f"{name} {kw}: a SpotError's message must be one line"
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{name} {kw}: {type(e).__name__} escaped instead of a SpotError: {e}")
    x = torch.randn(batch, *sparse.plan.input_shape[1:])
    with torch.no_grad():
        y, dense = sparse(x), model(x)
    assert y.shape == dense.shape and torch.isfinite(y).all(), f"{name} {kw}"
    ratio = sparse.plan.flops_ratio
    if config.keep is None and config.budget >= 1.0:
        assert torch.equal(y, dense) and ratio == 1.0, f"{name} {kw}: budget 1.0 must be the model itself"
    elif config.keep is None:
        assert ratio <= config.budget + 1e-9, f"{name} {kw}: ratio {ratio:.4f} over the budget"
        assert ratio >= config.budget - 2 * config.tolerance, f"{name} {kw}: ratio {ratio:.4f} far under the budget"
    else:
        assert [s.keep for s in sparse.plan.stages] == list(config.keep), f"{name} {kw}"


def test_the_draws_cover_both_outcomes(models):
    """The fuzz cases above are not all refusals (nor all successes): a fuzz that only ever raised would test little."""
    outcomes = set()
    for seed in range(CASES):
        name, kw, _ = _draw(random.Random(seed))
        try:
            sc.SparsifyConfig(**kw)
            outcomes.add("valid config")
        except sc.SpotError:
            outcomes.add("refused config")
    assert outcomes == {"valid config", "refused config"}
