"""Reading checkpoint files safely, and fingerprints that tie a file to the model it was made for.

Every file a user or a directory supplies is read here, with `torch.load(weights_only=True)`: tensors and plain
containers only, so a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch
from torch import nn

from spot_compile.errors import CheckpointError
from spot_compile.graph.blocks import ModelStructure


def fingerprint(model: nn.Module, structure: ModelStructure) -> str:
    """Hash of the block structure and of every parameter's name and shape."""
    desc = {
        "blocks": [(b.kind, b.tokens, b.dim, b.heads) for b in structure.blocks],
        "special": structure.num_special,
        "params": _parameter_shapes(model),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def parameter_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter's and buffer's name and shape: checkable before the model is captured, so a file made
    for another model is named as such instead of failing later on a stage index or an input size."""
    return hashlib.sha256(json.dumps(_parameter_shapes(model)).encode()).hexdigest()[:16]


def _parameter_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())


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
        # torch's own text here advises weights_only=False, which is exactly what must not be done with this file
        raise CheckpointError(f"{path} is not a readable checkpoint (a pickle of something other than tensors and plain "
                              "containers, or a corrupt or truncated file); pass a file spot-compile wrote") from None
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
