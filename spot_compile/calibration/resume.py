"""Resuming a calibration exactly: the partial checkpoint `<out>.partial` (what it holds, how it is read back and
refused when another run wrote it), the random generators it saves and restores, what identifies the data a run
trains on, and the lock that keeps two runs off one `--out`.

A partial records every setting that changes the result (the model, the data and its split, the seed, the schedule,
the optimiser, the loss weights, the preprocessing, the precision, the device); a run with any of them different is
refused, naming each setting and its two values, never resumed into a result neither setting would give.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from spot_compile.errors import CheckpointError, UsageError
from spot_compile.serialization.checkpoints import load_tensors
from spot_compile.serialization.files import process_alive, save_atomically

PARTIAL_FORMAT = "spot-compile/calibration-partial/4"  # 4: the identity records the data, seed, schedule and preprocessing


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
    try:
        state = load_tensors(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; it is this run's partial checkpoint: delete it to start afresh") from None
    if not isinstance(state, dict) or state.get("format") != PARTIAL_FORMAT:
        raise CheckpointError(f"{path} is not a partial calibration this version wrote; delete it, or choose another --out")
    theirs = json.loads(state.get("identity", "{}"))
    differ = [f"{k}: {_shown(theirs.get(k))} there, {_shown(identity[k])} here" for k in identity if theirs.get(k) != identity[k]]
    if differ:
        raise CheckpointError(f"{path} is a partial calibration of another run ({'; '.join(differ)}); delete it to start "
                              "afresh with these settings, run again with that run's settings to resume it, or choose another --out")
    return state


def _shown(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def data_identity(data: Dataset) -> str:
    """A short hash of which images `data` holds, in which order: the files behind it (paths, or an IDX file's name,
    size and time), the subset of them a split took, and the labels; the same data read again hashes the same."""
    h = hashlib.sha256()
    _describe(data, h)
    return h.hexdigest()[:16]


def _describe(data, h) -> None:
    h.update(type(data).__name__.encode())
    h.update(str(len(data)).encode())
    if isinstance(data, Subset):
        h.update(json.dumps(list(map(int, data.indices))).encode())
        _describe(data.dataset, h)
    elif getattr(data, "samples", None) is not None:  # an ImageFolder: its files and labels
        for p, y in data.samples:
            h.update(f"{p}\0{int(y)}\n".encode())
    elif getattr(data, "where", None) is not None:  # an IDX split: the file, and its labels
        stat = os.stat(data.where)
        h.update(f"{data.where}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        h.update(data.labels.numpy().tobytes())
    elif getattr(data, "data", None) is not None and hasattr(data.data, "labels"):  # an in-memory ImageSet
        h.update(data.data.labels.numpy().tobytes())
        h.update(data.data.images.float().sum(dim=(1, 2, 3)).numpy().tobytes())
    else:  # another Dataset: its labels, read once
        h.update(json.dumps([int(data[i][1]) for i in range(len(data))]).encode())


class RunLock:
    """`<out>.lock`, holding the pid of the run writing `out`: a second run with the same `--out` is refused while
    the first lives; the lock of a run that was killed is taken over."""

    def __init__(self, out: Path) -> None:
        self.path = out.with_suffix(".lock")
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder != os.getpid() and process_alive(holder):
                    raise UsageError(f"another calibration (pid {holder}) is writing {self.path.with_suffix('')}: wait for it to "
                                     f"finish, or choose another --out") from None
                self.path.unlink(missing_ok=True)  # its run is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return
        raise UsageError(f"{self.path} keeps reappearing: another calibration is starting with the same --out; choose another")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

