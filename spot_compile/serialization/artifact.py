"""Saving a sparsified model and restoring it onto the model it came from.

The artifact holds what is needed to rebuild the graph deterministically (config with the solved keep counts,
the plan, scorer weights, and for SPOT the predictor file's contents, a tuned backbone as its difference to the
model) and a fingerprint of the model's structure and parameter shapes, so that loading it onto
another model, or at another input size, is an error instead of a silent mismatch. Weights of the backbone are
not stored (a tuned backbone's difference aside): they are the user's model's own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from spot_compile.api import SCORER_NAME, sparsify
from spot_compile.config import SparsifyConfig
from spot_compile.errors import BudgetError, CheckpointError, InputSizeError, SpotError, StructureError, UsageError, first_line
from spot_compile.policies import policy_names
from spot_compile.serialization.checkpoints import fingerprint, parameter_fingerprint, read_checkpoint
from spot_compile.serialization.configs import config_from_dict, config_to_dict
from spot_compile.serialization.files import save_atomically
from spot_compile.serialization.predictors import embedded_predictors, predictor_file

FORMAT = "spot-compile/sparse/1"


def save(sparse, model: nn.Module, path: str | Path | None = None) -> None:
    """Writes `sparse` (a SparseViT made from `model`) to `path`: `save(sparse, model, "sparse.pt")`."""
    if path is None or not isinstance(model, nn.Module):
        given = f"a {type(model).__name__} as the model" if not isinstance(model, nn.Module) else "no path"
        raise UsageError(f"save takes the sparse model, the model it was made from, and the file: "
                         f"spot_compile.save(sparse, model, 'sparse.pt') (got {given})")
    if not sparse.config.policy_config.storable:
        raise UsageError(f"a model sparsified with policy {sparse.config.policy!r} holds scorer modules of your own, which "
                         "are not saved; save your scorers' weights yourself and sparsify again when loading, or save "
                         "predictors with `spot-compile calibrate` and sparsify with predictors=FILE")
    stages = tuple(s.block for s in sparse.plan.stages)
    # A dense plan (budget 1.0) has no keep counts: None, so that loading it solves the same (empty) schedule.
    config = dataclasses.replace(sparse.config, keep=tuple(s.keep for s in sparse.plan.stages) if stages else None,
                                 stages=stages or sparse.config.stages)
    record = {
        "format": FORMAT,
        "config": json.dumps(config_to_dict(config)),
        "plan": json.dumps(sparse.plan.to_dict()),
        "fingerprint": fingerprint(model, sparse.structure),
        "parameters": parameter_fingerprint(model),
        "scorers": {name: m.state_dict() for name, m in sparse.scorers.items()},
    }
    if config.predictors is not None:  # self-contained: the predictor file travels inside, a tuned backbone as a diff
        record["predictors"] = sparse.predictor_record or embedded_predictors(config.predictors, model)
    save_atomically(record, path, "the output file")


def load(path: str | Path, model: nn.Module):
    """Rebuilds the SparseViT saved at `path` on `model`; refuses a model or input size it was not made for."""
    data = read_checkpoint(path, FORMAT)
    different = f"{path} was made for a different model"
    ours = parameter_fingerprint(model)
    if data.get("parameters", ours) != ours:  # files written before the field existed are checked after the rebuild
        raise CheckpointError(f"{different} (its parameter names or shapes differ); sparsify this model afresh")
    try:
        stored = json.loads(data["config"])
        policy = stored.get("policy") if isinstance(stored, dict) else None
        if isinstance(policy, str) and policy not in policy_names():
            raise CheckpointError(f"{path} was made with token policy {policy!r}, which is not installed here (a plug-in "
                                  "policy?); install the package that provides it, then load the file again")
        config = config_from_dict(stored, SparsifyConfig, str(path))
        plan = json.loads(data["plan"])
        input_shape = list(plan["input_shape"])
    except (KeyError, TypeError, ValueError, SpotError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} holds a damaged sparse-model record ({first_line(e)}); write it again") from None
    if config.input_size is None:
        config.input_size = tuple(input_shape[-2:])
    embedded = data.get("predictors")
    try:
        if isinstance(embedded, dict):  # the predictors it carries, not whatever now lies at the path it names
            with predictor_file(embedded, model) as carried:
                sparse = sparsify(model, dataclasses.replace(config, predictors=carried))
            sparse.config, sparse.predictor_record = config, embedded
        else:  # written before artifacts carried their predictors: the file at the path
            sparse = sparsify(model, config)
    except (BudgetError, InputSizeError, StructureError) as e:  # the stages or input size of another model: say which file, not which setting
        raise CheckpointError(f"{different} ({e}); sparsify this model afresh") from None
    if fingerprint(model, sparse.structure) != data["fingerprint"]:
        raise CheckpointError(f"{different} (structure or parameter shapes differ); sparsify this model afresh")
    scorers = data.get("scorers")
    if not isinstance(scorers, dict) or not all(isinstance(s, dict) for s in scorers.values()):
        raise CheckpointError(f"{path} holds a damaged sparse-model record (its scorer weights are no state dicts); write it again")
    # by block: files written before scorers were named after their policy call every one `spot_scorer_<block>`
    by_block = {SCORER_NAME.fullmatch(n).group(1): m for n, m in sparse.scorers.items()}
    for name, state in scorers.items():
        match = SCORER_NAME.fullmatch(name) if isinstance(name, str) else None
        scorer = sparse.scorers.get(name) or (by_block.get(match.group(1)) if match else None)
        if scorer is None:
            raise CheckpointError(f"{path} has scorer {name!r} that this model's plan lacks; sparsify this model afresh")
        scorer.load_state_dict(state)
    if list(sparse.plan.input_shape[1:]) != input_shape[1:]:
        raise CheckpointError(f"{path} was made for input {input_shape[1:]}, not {list(sparse.plan.input_shape[1:])}")
    return sparse
