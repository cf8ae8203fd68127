"""Calibration with the predictors' inputs detached from the backbone (`CalibrationConfig.experimental`'s
`backbone_from_scores=False`)."""

import pytest
import torch

from spot_compile.calibration.trainer import calibrate
from spot_compile.data.imageset import ImageSet
from spot_compile.scorers.spot import PredictorConfig

from .conftest import small_vit


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
