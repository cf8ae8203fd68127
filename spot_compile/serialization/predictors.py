"""The calibrated predictor file: the predictors' weights and config, their stages and budget, the calibration record,
and the tuned backbone where the backbone was fine-tuned, tied to its model by a fingerprint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spot_compile.errors import CheckpointError
from spot_compile.graph.blocks import ModelStructure
from spot_compile.scorers.spot import PredictorConfig, SpotPredictor, make_predictors
from spot_compile.serialization.checkpoints import fingerprint, read_checkpoint
from spot_compile.serialization.configs import config_from_dict, config_to_dict
from spot_compile.serialization.files import save_atomically

FORMAT = "spot-compile/predictors/2"  # 1: the N×N descriptor of 6 features per head


@dataclass
class PredictorCheckpoint:
    predictors: dict[int, SpotPredictor]
    stages: tuple[int, ...]
    budget: float
    config: PredictorConfig
    metrics: dict = field(default_factory=dict)
    backbone: dict[str, torch.Tensor] | None = None  # the model's state dict when calibrated with --finetune


def save_predictors(path, ckpt: PredictorCheckpoint, model: nn.Module, structure: ModelStructure) -> None:
    save_atomically(
        {
            "format": FORMAT,
            "config": json.dumps(config_to_dict(ckpt.config)),
            "stages": list(ckpt.stages),
            "budget": ckpt.budget,
            "fingerprint": fingerprint(model, structure),
            "state": {str(s): p.state_dict() for s, p in ckpt.predictors.items()},
            "metrics": json.dumps(ckpt.metrics),
            "backbone": ckpt.backbone,
        },
        path, "--out",
    )


def load_predictor_checkpoint(path, model: nn.Module, structure: ModelStructure) -> PredictorCheckpoint:
    if path is None:
        raise CheckpointError("policy 'spot' needs calibrated predictors: pass --predictors FILE (made by spot-compile calibrate)")
    data = read_checkpoint(path, FORMAT)
    if data["fingerprint"] != fingerprint(model, structure):
        raise CheckpointError(f"{path} was calibrated for a different model (structure or parameter shapes differ); "
                              "calibrate predictors for this model")
    config = config_from_dict(json.loads(data["config"]), PredictorConfig, str(path))
    stages = tuple(data["stages"])
    predictors = make_predictors(structure, stages, config)
    for s, p in predictors.items():
        p.load_state_dict(data["state"][str(s)])
        p.eval()
        if not all(torch.isfinite(v).all() for v in p.state_dict().values()):
            raise CheckpointError(f"{path} holds predictor weights that are NaN or infinite (stage {s}): its calibration "
                                  "diverged; calibrate again (a lower --lr)")
    return PredictorCheckpoint(predictors, stages, data["budget"], config, json.loads(data["metrics"]), data.get("backbone"))


def with_tuned_backbone(model: nn.Module, path) -> nn.Module:
    """`model` itself, or, when the checkpoint at `path` was calibrated with a tuned backbone, a copy of `model`
    carrying that backbone (the user's model is left as it was)."""
    backbone = read_checkpoint(path, FORMAT).get("backbone")
    if backbone is None:
        return model
    tuned = copy.deepcopy(model)
    try:
        tuned.load_state_dict(backbone)
    except RuntimeError:
        raise CheckpointError(f"{path} was calibrated for a different model (its tuned backbone does not fit this one); "
                              "calibrate predictors for this model") from None
    return tuned


def load_predictor_metrics(path) -> dict:
    """The calibration record (history, seconds, keep counts) stored in a predictor checkpoint."""
    return json.loads(read_checkpoint(path, FORMAT)["metrics"])


def embedded_predictors(path, model: nn.Module) -> dict:
    """The predictor file at `path` as a record a saved sparse model carries, so that it loads without the file: all
    of it, a tuned backbone as its difference to `model` (the entries the fine-tune changed)."""
    data = dict(read_checkpoint(path, FORMAT))
    backbone = data.pop("backbone", None)
    if backbone is not None:
        own = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        data["backbone_diff"] = {k: v for k, v in backbone.items() if k not in own or not torch.equal(v, own[k])}
    return data


@contextlib.contextmanager
def predictor_file(record: dict, model: nn.Module) -> Iterator[str]:
    """A temporary predictor file holding `record` (`embedded_predictors`'), its tuned backbone rebuilt on `model`'s
    own state, for the duration of the block: the spot policy reads its predictors from a file."""
    record = dict(record)
    diff = record.pop("backbone_diff", None)
    if diff is not None:
        record["backbone"] = {**{k: v.detach().cpu() for k, v in model.state_dict().items()}, **diff}
    with tempfile.TemporaryDirectory(prefix="spot_compile_predictors_") as d:
        path = Path(d) / "predictors.pt"
        torch.save(record, path)
        yield str(path)
