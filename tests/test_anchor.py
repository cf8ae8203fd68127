"""Predictors anchored on the class token's attention (`PredictorConfig.anchor`), and calibration with the
predictors' inputs detached from the backbone (`calibrate(backbone_from_scores=False)`)."""

import pytest
import torch

import spot_compile as sc
from spot_compile.calibration.trainer import calibrate
from spot_compile.cli.visualize import kept_patches
from spot_compile.data.imageset import ImageSet
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.scorers.spot import PredictorConfig, make_predictors
from spot_compile.serialization.predictors import PredictorCheckpoint, load_predictor_checkpoint, save_predictors

from .conftest import calibration_and_pruned_graphs, small_vit

STAGES, KEEP = (1, 3), (30, 12)


@pytest.mark.parametrize("overrides", [dict(), dict(attention="explicit", qkv="separate")], ids=["sdpa", "explicit"])
def test_an_anchored_predictor_starts_as_class_attention(overrides):
    model = small_vit(**overrides)
    structure = find_blocks(capture(model, example_input(model, None)))
    anchored = make_predictors(structure, STAGES, PredictorConfig(hidden=16, anchor=True))
    spot = sc.sparsify(model, sc.SparsifyConfig(keep=KEEP, stages=STAGES, policy=sc.GivenScorersConfig(anchored)))
    evit = sc.sparsify(model, sc.SparsifyConfig(keep=KEEP, stages=STAGES, policy="class-attention"))
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        for mine, theirs in zip(kept_patches(spot, x), kept_patches(evit, x)):
            assert torch.equal(mine, theirs)
        torch.testing.assert_close(spot(x), evit(x), atol=1e-5, rtol=1e-4)
    # Not a plain class-attention scorer: a learned correction moves the selection away from it.
    for p in anchored.values():
        torch.nn.init.normal_(p.mix[3].weight, std=3.0)
    with torch.no_grad():
        assert not all(torch.equal(a, b) for a, b in zip(kept_patches(spot, x), kept_patches(evit, x)))


def test_an_anchored_calibration_graph_equals_hard_pruning_and_the_checkpoint_keeps_the_anchor(tmp_path):
    model = small_vit(pool="avg", num_registers=2)  # no class token: the anchor reads the attention received
    structure = find_blocks(capture(model, example_input(model, None)))
    predictors = make_predictors(structure, STAGES, PredictorConfig(hidden=16, anchor=True))
    assert all(p.anchor_feature == 1 for p in predictors.values())
    for p in predictors.values():
        torch.nn.init.normal_(p.mix[3].weight, std=1.0)
        p.anchor_scale.data.fill_(2.0)
    student, keepers, sparse = calibration_and_pruned_graphs(model, STAGES, KEEP, predictors)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(student(x), sparse(x), atol=1e-5, rtol=1e-4)
    out = tmp_path / "pred.pt"
    config = PredictorConfig(hidden=16, anchor=True)
    save_predictors(out, PredictorCheckpoint(predictors, STAGES, 0.6, config), model, structure)
    loaded = load_predictor_checkpoint(out, model, structure)
    assert loaded.config.anchor and all(float(p.anchor_scale) == 2.0 for p in loaded.predictors.values())
    reloaded = sc.sparsify(model, sc.SparsifyConfig(keep=KEEP, stages=STAGES, policy=sc.GivenScorersConfig(loaded.predictors)))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), sparse(x))


def test_an_anchor_without_the_interaction_signal_is_refused():
    with pytest.raises(ValueError, match="keep 'interaction' among the signals"):
        PredictorConfig(signals=("embedding", "dynamics"), anchor=True)


@pytest.mark.parametrize("from_scores", [True, False], ids=["through-scores", "detached"])
def test_detached_scorer_inputs_stop_the_scores_gradient_reaching_the_backbone(from_scores, monkeypatch):
    # Only the keep-ratio loss trains (no labels, no teacher): its gradient reaches the backbone through the
    # predictors' inputs alone, so a detached calibration moves the backbone by AdamW's weight decay alone.
    from spot_compile.calibration import losses

    monkeypatch.setattr(losses.F, "cross_entropy", lambda logits, y: logits.sum() * 0)
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    data = ImageSet(torch.rand(64, 1, 16, 16), torch.randint(0, 10, (64,)), tuple("0123456789"))
    calibrate(model, data, data.subset(torch.arange(16)), budget=0.6, epochs=1, batch_size=32, lr=5e-3,
              predictor=PredictorConfig(hidden=16), compile=False, finetune=True, finetune_graph="calibration", backbone_lr=1e-2, logit_distill=0.0,
              backbone_from_scores=from_scores)
    qkv = "blocks.0.attn.qkv.weight"  # in front of the first stage: it feeds the first predictor's descriptor
    moved = float((model.state_dict()[qkv] - before[qkv]).abs().max())
    assert (moved > 1e-4) == from_scores
