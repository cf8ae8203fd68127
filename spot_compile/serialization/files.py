"""Checks that a result can be written, made before the slow work that produces it (a calibration takes minutes;
losing it to a typo in `--out` is not acceptable)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from spot_compile.errors import OutputPathError, first_line


def check_writable_file(path: str | Path, what: str = "--out") -> Path:
    """`path` can be created or overwritten as a file; raises OutputPathError naming `what` otherwise.

    The check opens the file for appending (and removes it again when it did not exist), since permission bits say
    nothing for root, read-only mounts or full quotas."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; give a file name, e.g. {path / 'out.pt'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        kind = "is not a directory" if parent.exists() else "does not exist"
        raise OutputPathError(f"{what} {path}: the directory {parent} {kind}; create it or choose another path")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise OutputPathError(f"{what} {path} cannot be written ({e.strerror or type(e).__name__}); choose another path") from None
    if not existed:
        path.unlink(missing_ok=True)
    return path


def check_writable_dir(path: str | Path, what: str = "--out-dir") -> Path:
    """`path` is (or is made into) a directory files can be written to; raises OutputPathError otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file, not a directory; choose a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{what} {path} cannot be created ({e.strerror or type(e).__name__}); choose another directory") from None
    probe = path / f".spot_compile_probe_{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise OutputPathError(f"{what} {path} is not writable ({e.strerror or type(e).__name__}); choose another directory") from None
    return path


def save_atomically(obj: object, path: str | Path, what: str = "--out") -> None:
    """`torch.save` to a temporary file beside `path`, then a rename: a run killed while writing leaves the old file
    (or none), never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a missing directory as a RuntimeError
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise OutputPathError(f"{what} {path} cannot be written ({reason}); choose another path") from None
