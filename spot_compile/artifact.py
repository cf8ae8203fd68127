"""Saving a sparsified model and restoring it onto the model it came from.

The artifact holds what is needed to rebuild the graph deterministically (config with the solved keep counts,
the plan, scorer weights) and a fingerprint of the model's structure and parameter shapes, so that loading it onto
another model, or at another input size, is an error instead of a silent mismatch. Weights of the backbone are
not stored: they are the user's model's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path

import torch
from torch import nn

from .config import SparsifyConfig
from .errors import BudgetError, CheckpointError, InputSizeError, SpotError, StructureError, first_line
from .outputs import save_atomically
from .passes.find_blocks import ModelStructure

FORMAT = "spot-compile/sparse/1"


def fingerprint(model: nn.Module, structure: ModelStructure) -> str:
    """Hash of the block structure and of every parameter's name and shape."""
    desc = {
        "blocks": [(b.kind, b.tokens, b.dim, b.heads) for b in structure.blocks],
        "special": structure.num_special,
        "params": sorted((k, tuple(v.shape)) for k, v in model.state_dict().items()),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def parameter_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter's and buffer's name and shape: checkable before the model is captured, so a file made
    for another model is named as such instead of failing later on a stage index or an input size."""
    params = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return hashlib.sha256(json.dumps(params).encode()).hexdigest()[:16]


def load_tensors(path: str | Path) -> object:
    """`torch.load` of a file a user supplied, with `weights_only=True`: tensors and plain containers only, so a
    pickle that would run code is refused, never executed. Any failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # the weights-only unpickler met a class or function to import: Python objects
            raise CheckpointError(
                f"{path} holds Python objects other than tensors, which could run code when loaded; spot-compile "
                "refuses to unpickle them: pass a file spot-compile wrote"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line(e)}); it is corrupt or truncated "
                              "(or no checkpoint at all), write it again") from None
    except Exception as e:  # torch.load raises KeyError, RuntimeError, EOFError, ... for a file that is no checkpoint
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}); it is corrupt or truncated "
                              "(or no checkpoint at all), write it again") from None


def read_checkpoint(path: str | Path, expected_format: str) -> dict:
    path = Path(path)
    data = load_tensors(path)
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        if isinstance(found, str) and found.rsplit("/", 1)[0] == expected_format.rsplit("/", 1)[0]:
            raise CheckpointError(f"{path} is in format {found!r}, written by another version of spot-compile; this one "
                                  f"reads {expected_format!r}: write it again with this version (e.g. spot-compile calibrate)")
        raise CheckpointError(f"{path} is not a {expected_format} file (found {found!r}); pass the file spot-compile wrote")
    return data


def save(sparse, model: nn.Module, path: str | Path) -> None:
    """Writes `sparse` (a SparseViT made from `model`) to `path`."""
    stages = tuple(s.block for s in sparse.plan.stages)
    # A dense plan (budget 1.0) has no keep counts: None, so that loading it solves the same (empty) schedule.
    config = dataclasses.replace(sparse.config, keep=tuple(s.keep for s in sparse.plan.stages) if stages else None,
                                 stages=stages or sparse.config.stages)
    save_atomically(
        {
            "format": FORMAT,
            "config": json.dumps(config.to_dict()),
            "plan": json.dumps(sparse.plan.to_dict()),
            "fingerprint": fingerprint(model, sparse.structure),
            "parameters": parameter_fingerprint(model),
            "scorers": {name: m.state_dict() for name, m in sparse.scorers.items()},
        },
        path, "the output file",
    )


def load(path: str | Path, model: nn.Module):
    """Rebuilds the SparseViT saved at `path` on `model`; refuses a model or input size it was not made for."""
    from .api import sparsify

    data = read_checkpoint(path, FORMAT)
    different = f"{path} was made for a different model"
    if data.get("parameters", parameter_fingerprint(model)) != parameter_fingerprint(model):
        raise CheckpointError(f"{different} (its parameter names or shapes differ); sparsify this model afresh")
    try:
        config_dict = json.loads(data["config"])
        config_dict["stages"] = tuple(config_dict["stages"]) if config_dict["stages"] is not None else None
        config_dict["keep"] = tuple(config_dict["keep"]) if config_dict["keep"] is not None else None
        config = SparsifyConfig(**config_dict)
        plan = json.loads(data["plan"])
        input_shape = list(plan["input_shape"])
    except (KeyError, TypeError, ValueError, SpotError) as e:
        raise CheckpointError(f"{path} holds a damaged sparse-model record ({first_line(e)}); write it again") from None
    if config.input_size is None:
        config.input_size = tuple(input_shape[-2:])
    try:
        sparse = sparsify(model, config)
    except (BudgetError, InputSizeError, StructureError) as e:  # the stages or input size of another model: say which file, not which setting
        raise CheckpointError(f"{different} ({e}); sparsify this model afresh") from None
    if fingerprint(model, sparse.structure) != data["fingerprint"]:
        raise CheckpointError(f"{different} (structure or parameter shapes differ); sparsify this model afresh")
    for name, state in data["scorers"].items():
        if name not in sparse.scorers:
            raise CheckpointError(f"{path} has scorer {name!r} that this model's plan lacks; sparsify this model afresh")
        sparse.scorers[name].load_state_dict(state)
    if list(sparse.plan.input_shape[1:]) != input_shape[1:]:
        raise CheckpointError(f"{path} was made for input {input_shape[1:]}, not {list(sparse.plan.input_shape[1:])}")
    return sparse
