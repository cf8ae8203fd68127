"""`calibrate(finetune=True)` tunes the backbone after the predictors, through the deployed sparse graph (the default
`finetune_graph`), or with them through the calibration graph ("calibration"); `rank_budget` calibrates the
predictors at another budget's keep counts than the one the backbone is tuned and validated at."""

import json

import pytest
import torch

import spot_compile as sc
from spot_compile.calibration import trainer as calibration
from spot_compile.data.imageset import ImageSet
from spot_compile.errors import UsageError

from .conftest import small_vit

ARGS = dict(budget=0.6, epochs=2, batch_size=4, compile=False, noise=0.3)  # 4 steps an epoch, 8 a phase


def _data():
    torch.manual_seed(3)
    train = ImageSet(torch.rand(18, 1, 16, 16), torch.randint(0, 10, (18,)), tuple("0123456789"))
    return train, train.subset(torch.arange(6))


def _predictors(result):
    return {f"{s}.{k}": v for s, p in result.checkpoint.predictors.items() for k, v in p.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_calibrates_as_a_frozen_run_then_tunes_the_backbone_through_the_deployed_graph(tmp_path, monkeypatch):
    train, val = _data()
    frozen = calibration.calibrate(small_vit(), train, val, **ARGS)

    real_sparsify = calibration.sparsify
    trained_through = []  # the deployed graph's forward passes that build a graph for backward

    def spied(*args, **kwargs):
        sparse = real_sparsify(*args, **kwargs)
        forward = sparse.graph_module.forward

        def counted(*x):
            if torch.is_grad_enabled():
                trained_through.append(x[0].shape[0])
            return forward(*x)

        sparse.graph_module.forward = counted
        return sparse

    monkeypatch.setattr(calibration, "sparsify", spied)
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "p.pt"
    tuned = calibration.calibrate(model, train, val, finetune=True, backbone_lr=1e-2, out=out, **ARGS)

    # The first phase is the frozen calibration, step for step; the second leaves the predictors as it found them.
    assert _equal(_predictors(tuned), _predictors(frozen))
    assert [r["phase"] for r in tuned.history] == ["calibrate", "calibrate", "tune", "tune"]
    assert [r["loss"] for r in tuned.history[:2]] == [r["loss"] for r in frozen.history]
    # ... and trains the backbone through the deployed graph, one forward a step, 8 steps of 4 images.
    assert trained_through == [4] * 8
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "blocks.3.mlp.2.weight" in changed
    assert _equal(tuned.checkpoint.backbone, model.state_dict())
    assert not any(p.requires_grad for p in model.parameters())
    metrics = tuned.checkpoint.metrics
    assert metrics["finetune"] and metrics["finetune_graph"] == "deployed"

    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert [r["phase"] for r in steps] == ["calibrate"] * 8 + ["tune"] * 8
    # The deployed graph keeps its static counts: no keep-ratio loss, no soft keep ratio to report.
    assert all(r["ratio_loss"] == 0.0 and "keep_ratio" not in r for r in steps[8:])
    assert all(r["ratio_loss"] > 0.0 and "keep_ratio" in r for r in steps[:8])

    fresh = small_vit()  # the weights `model` started from: the checkpoint brings the tuned backbone with it
    loaded = sc.sparsify(fresh, sc.SparsifyConfig(budget=0.6, policy="spot", predictors=str(out)))
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tuned.sparse(x))


def test_finetune_through_the_calibration_graph_tunes_backbone_and_predictors_in_the_same_steps():
    train, val = _data()
    frozen = calibration.calibrate(small_vit(), train, val, **ARGS)
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    joint = calibration.calibrate(model, train, val, finetune=True, finetune_graph="calibration", backbone_lr=1e-2, **ARGS)
    assert [r["phase"] for r in joint.history] == ["calibrate", "calibrate"]
    assert not _equal(_predictors(joint), _predictors(frozen)), "the backbone moved under the predictors as they learned"
    assert not _equal(model.state_dict(), before)
    assert joint.checkpoint.metrics["finetune_graph"] == "calibration"


@pytest.mark.parametrize("stop_at", [8, 11], ids=["phase-boundary", "mid-tune"])
def test_a_finetune_stopped_and_started_again_ends_as_one_that_was_not(tmp_path, monkeypatch, stop_at):
    train, val = _data()
    args = {**ARGS, "finetune": True, "backbone_lr": 1e-2}
    whole = calibration.calibrate(small_vit(), train, val, **args)
    out = tmp_path / "p.pt"
    real_lr = calibration.cosine_lr
    begun = []

    def dies(step, *a, **kw):  # the process dies as global step `stop_at` + 1 begins (as a SIGKILL would)
        begun.append(step)
        if len(begun) == stop_at + 1:
            raise KeyboardInterrupt
        return real_lr(step, *a, **kw)

    monkeypatch.setattr(calibration, "cosine_lr", dies)
    with pytest.raises(KeyboardInterrupt):
        calibration.calibrate(small_vit(), train, val, out=out, save_every=1, **args)
    monkeypatch.setattr(calibration, "cosine_lr", real_lr)
    resumed = calibration.calibrate(small_vit(), train, val, out=out, save_every=1, **args)
    assert _equal(_predictors(resumed), _predictors(whole))
    assert _equal(resumed.checkpoint.backbone, whole.checkpoint.backbone)
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in whole.history], rel=1e-6)
    steps = [json.loads(line)["step"] for line in out.with_suffix(".jsonl").read_text().splitlines() if '"step"' in line]
    assert steps == list(range(1, 17)), "each step once, across the stop"


def test_an_unknown_finetune_graph_is_refused_before_any_work():
    train, val = _data()
    with pytest.raises(UsageError, match="unknown fine-tune graph 'both'; choose deployed or calibration"):
        calibration.calibrate(small_vit(), train, val, finetune=True, finetune_graph="both", **ARGS)


@pytest.mark.parametrize("peak", [6, 13], ids=["best-in-calibration", "best-in-tune"])
def test_val_every_with_finetune_returns_the_best_check_of_either_phase(monkeypatch, peak):
    # Validation is scripted to peak at check `peak` of 16 (one a step). Peaking in the calibration, the tune must
    # start from the predictors of that check, and the run must hand back the backbone as it was then (untuned).
    train, val = _data()
    script = [10.0 + (20.0 if i == peak else 0.0) + i * 0.01 for i in range(1, 17)]
    seen = []  # the pruned model's weights at each check

    def scripted(model, *rest):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return script[len(seen) - 1]

    monkeypatch.setattr(calibration, "_shared_accuracy", scripted)
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = calibration.calibrate(model, train, val, finetune=True, backbone_lr=1e-2, val_every=1, lr=0.05, **ARGS)
    assert len(seen) == 16 and result.checkpoint.metrics["selected_step"] == peak
    kept = result.sparse.state_dict()
    assert _equal(kept, seen[peak - 1]) and not _equal(kept, seen[-1])
    assert _equal(result.checkpoint.backbone, model.state_dict())
    if peak <= 8:
        assert _equal(model.state_dict(), before), "the best check came before the tune: the backbone is the user's"
        tuned_from = {k: v for k, v in seen[8].items() if k.startswith("graph_module.spot_")}  # first check of the tune
        assert _equal(tuned_from, {k: v for k, v in seen[peak - 1].items() if k.startswith("graph_module.spot_")})


def test_rank_budget_calibrates_at_its_keep_counts_and_tunes_and_validates_at_the_budget(monkeypatch):
    train, val = _data()
    at_low = calibration.calibrate(small_vit(), train, val, **{**ARGS, "budget": 0.4})
    at_budget = calibration.calibrate(small_vit(), train, val, **{**ARGS, "epochs": 1, "max_steps": 1})

    real_sparsify = calibration.sparsify
    ran = []  # (budget, training?) of each forward through a sparsified graph: every one but the calibration graph's

    def spied(model, config, **kwargs):
        sparse = real_sparsify(model, config, **kwargs)
        forward = sparse.graph_module.forward

        def counted(*x):
            ran.append((config.budget, torch.is_grad_enabled()))
            return forward(*x)

        sparse.graph_module.forward = counted
        return sparse

    monkeypatch.setattr(calibration, "sparsify", spied)
    ranked = calibration.calibrate(small_vit(), train, val, finetune=True, backbone_lr=1e-2, rank_budget=0.4, **ARGS)

    # The predictors learn exactly as a calibration at 0.4 does (the tune phase leaves them alone) ...
    assert _equal(_predictors(ranked), _predictors(at_low))
    assert [r["loss"] for r in ranked.history[:2]] == [r["loss"] for r in at_low.history]
    keep_low, keep_budget = at_low.checkpoint.metrics["keep"], at_budget.checkpoint.metrics["keep"]
    assert keep_low != keep_budget
    assert ranked.checkpoint.metrics["keep"] == keep_low and ranked.checkpoint.metrics["rank_budget"] == 0.4
    # ... while the checkpoint, its validations and the backbone's tune are at the budget: 8 tune steps through 0.6,
    # and the 4 epochs' validations (one batch each) too.
    assert ranked.checkpoint.budget == 0.6 and [s.keep for s in ranked.sparse.plan.stages] == keep_budget
    assert [b for b, training in ran if training] == [0.6] * 8
    assert [b for b, training in ran if not training] == [0.6] * 4
