"""Each policy's settings as a config of its own: the two spellings agree, a conflict is one line, a plug-in's own
settings travel through a saved model, and scorers of the caller's own are a registered policy."""

import dataclasses
import warnings

import pytest
import torch

import spot_compile as sc
from spot_compile import policy_configs
from spot_compile.errors import BudgetError, UsageError
from spot_compile.policies import DropPolicy, register, registry
from spot_compile.scorers.training_free import ClassAttentionScorer

from .conftest import small_vit


def test_a_policy_config_and_its_flat_spelling_are_the_same_config():
    assert sc.SparsifyConfig(policy=sc.SpotConfig("p.pt")) == sc.SparsifyConfig(policy="spot", predictors="p.pt")
    assert sc.SparsifyConfig(policy=sc.ClassAttentionConfig(fuse=True)) == sc.SparsifyConfig(policy="class-attention", fuse_pruned=True)
    config = sc.SparsifyConfig(policy=sc.SpotConfig("p.pt"))
    assert config.policy == "spot" and config.predictors == "p.pt" and config.policy_config == sc.SpotConfig("p.pt")
    # replace() changes a setting through its shorthand, and a new policy drops the old one's settings
    assert dataclasses.replace(config, predictors="q.pt").policy_config == sc.SpotConfig("q.pt")
    assert dataclasses.replace(config, predictors=None, policy="merge").policy_config == sc.MergeConfig()


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy=sc.SpotConfig("a.pt"), predictors="b.pt"), "predictors (--predictors) is 'b.pt' but the policy's config says 'a.pt'; give it once"),
    (dict(policy=sc.MergeConfig(), fuse_pruned=True), "fuse_pruned (--fuse) applies to policies that drop tokens, not to 'merge'"),
    (dict(policy="given-scorers"), "policy 'given-scorers' takes Python objects as settings: pass policy=GivenScorersConfig(...)"),
    (dict(policy=3), "unknown policy 3; choose one of merge, class-attention, random, spot"),
])
def test_settings_that_contradict_each_other_are_one_line(kwargs, message):
    with pytest.raises(BudgetError) as e:
        sc.SparsifyConfig(**kwargs)
    assert str(e.value) == message


def test_policy_configs_check_their_own_settings():
    with pytest.raises(BudgetError, match="fuse must be True or False"):
        sc.RandomConfig(fuse="yes")
    with pytest.raises(BudgetError, match="predictors must be a file path"):
        sc.SpotConfig(3)
    with pytest.raises(BudgetError, match="needs scorers"):
        sc.GivenScorersConfig({})
    with pytest.raises(BudgetError, match=r"got 1 -> int"):
        sc.GivenScorersConfig({1: 3})


def test_a_plug_ins_own_settings_shape_its_graph_and_travel_through_a_saved_model(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_POLICIES", dict(registry._POLICIES))
    monkeypatch.setattr(policy_configs, "_CONFIGS", dict(policy_configs._CONFIGS))

    @dataclasses.dataclass(frozen=True)
    class EveryNthConfig(policy_configs.DropConfig):
        name = "every-nth"
        n: int = 2

    class EveryNth(torch.nn.Module):
        attention, history = "none", 0

        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, tokens):
            index = torch.arange(tokens.shape[1], dtype=tokens.dtype)
            return (index % self.n == 0).to(tokens.dtype).expand(tokens.shape[0], -1) - index / tokens.shape[1]

    @register
    class EveryNthPolicy(DropPolicy):
        name = "every-nth"
        summary = "keep every n-th patch token first (a test plug-in)"
        config_type = EveryNthConfig

        def scorer(self, stage):
            return EveryNth(self.settings.n)

    model = small_vit()
    x = torch.randn(2, 1, 16, 16)
    three = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy=EveryNthConfig(n=3)))
    two = sc.sparsify(model, sc.SparsifyConfig(budget=0.6, policy="every-nth"))
    with torch.no_grad():
        assert not torch.allclose(three(x), two(x))  # the setting reached the scorer
    sc.save(three, model, tmp_path / "nth.pt")
    loaded = sc.load(tmp_path / "nth.pt", model)
    assert loaded.config.policy_config == EveryNthConfig(n=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), three(x))


def test_scorers_of_ones_own_are_a_registered_policy_and_the_old_keyword_still_works():
    model = small_vit()
    scorers = {2: ClassAttentionScorer(True), 3: ClassAttentionScorer(True)}
    config = sc.SparsifyConfig(keep=(30, 20), policy=sc.GivenScorersConfig(scorers))
    given = sc.sparsify(model, config)
    assert given.plan.policy == "given-scorers" and tuple(s.block for s in given.plan.stages) == (2, 3)
    reference = sc.sparsify(model, sc.SparsifyConfig(keep=(30, 20), stages=(2, 3), policy="class-attention"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = sc.sparsify(model, sc.SparsifyConfig(keep=(30, 20)), scorers=scorers)
    assert any(issubclass(w.category, DeprecationWarning) and "GivenScorersConfig" in str(w.message) for w in caught)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(given(x), reference(x))
        torch.testing.assert_close(old(x), reference(x))


def test_a_model_with_scorers_of_ones_own_is_not_saved_half(tmp_path):
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(keep=(30,), policy=sc.GivenScorersConfig({2: ClassAttentionScorer(True)})))
    with pytest.raises(UsageError, match="holds scorer modules of your own, which are not saved"):
        sc.save(sparse, model, tmp_path / "given.pt")
    assert not (tmp_path / "given.pt").exists()
