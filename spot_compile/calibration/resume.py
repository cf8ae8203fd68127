"""Resuming a calibration exactly: the partial checkpoint `<out>.partial` (what it holds, how it is read back and
refused when another run wrote it) and the random generators it saves and restores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spot_compile.errors import CheckpointError
from spot_compile.serialization.checkpoints import load_tensors
from spot_compile.serialization.files import save_atomically

PARTIAL_FORMAT = "spot-compile/calibration-partial/3"


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_partial(path: Path, identity: dict, state: dict) -> None:
    """`state` (tensors and plain containers) with the run's `identity`, atomically."""
    save_atomically({"format": PARTIAL_FORMAT, "identity": json.dumps(identity, sort_keys=True), **state}, path, "--out")


def read_partial(path: Path, identity: dict) -> dict:
    """The partial checkpoint at `path` (tensors only: nothing in it can run code), when it was written by a run of
    this same calibration; a partial of another model, budget, stage list or setup is refused, not resumed."""
    state = load_tensors(path)
    if not isinstance(state, dict) or state.get("format") != PARTIAL_FORMAT:
        raise CheckpointError(f"{path} is not a partial calibration this version wrote; delete it, or choose another --out")
    theirs = json.loads(state.get("identity", "{}"))
    differ = [k for k in identity if theirs.get(k) != identity[k]]
    if differ:
        raise CheckpointError(f"{path} is a partial calibration of another run ({', '.join(differ)} differ); delete it to "
                              "start afresh, or choose another --out")
    return state
