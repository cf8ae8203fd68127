"""Writing results safely: checks made before the slow work that produces them (a calibration takes minutes; losing
it to a typo in `--out` is not acceptable), and writes that cannot be redirected or left half done.

Every file spot-compile writes goes through `atomic_file`: a temporary file created exclusively beside the target
(`tempfile.mkstemp`, so a link planted under a predictable name is never followed), then renamed over it, so that a
run killed while writing leaves the old file or none, never a truncated one. An output given as a symbolic link is
refused; a full disk is reported as such; temporary files left by a killed run are removed by the next write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from spot_compile.errors import OutputPathError, first_line

# Below this much free space a write is refused before it starts: a file system with a few kilobytes left accepts
# the writability probe and then fails mid-write.
MIN_FREE_BYTES = 1 << 20


def check_writable_file(path: str | Path, what: str = "--out") -> Path:
    """`path` can be created or overwritten as a file; raises OutputPathError naming `what` otherwise.

    The check opens the file for appending (and removes it again when it did not exist), since permission bits say
    nothing for root, read-only mounts or full quotas."""
    path = Path(path)
    _refuse_link(path, what)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; give a file name, e.g. {path / 'out.pt'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        kind = "is not a directory" if parent.exists() else "does not exist"
        raise OutputPathError(f"{what} {path}: the directory {parent} {kind}; create it or choose another path")
    existed = path.exists()
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666))
    except OSError as e:
        raise OutputPathError(f"{what} {path} cannot be written ({reason(e, parent)}); choose another path") from None
    if not existed:
        path.unlink(missing_ok=True)
    _refuse_full(parent, f"{what} {path}")
    remove_stale_temporaries(path)
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
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".spot_compile_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"{what} {path} is not writable ({reason(e, path)}); choose another directory") from None
    _refuse_full(path, f"{what} {path}")
    return path


def save_atomically(obj: object, path: str | Path, what: str = "--out") -> None:
    """`torch.save(obj)` to `path` through `atomic_file`."""
    with atomic_file(path, what) as f:
        torch.save(obj, f)


def write_text(path: str | Path, text: str, what: str) -> None:
    """`text` to `path` through `atomic_file`."""
    with atomic_file(path, what) as f:
        f.write(text.encode())


@contextlib.contextmanager
def atomic_file(path: str | Path, what: str) -> Iterator:
    """A binary file object whose contents become `path` when the block ends without an error: written to a
    temporary file created exclusively beside `path` (named `.NAME.<pid>.<random>.tmp`), flushed to disk, then
    renamed over `path`. Any failure removes the temporary file, keeps what `path` held, and raises one
    OutputPathError naming `what` (a full disk as "no space left on device")."""
    path = Path(path)
    _refuse_link(path, what)
    parent = path.parent if str(path.parent) else Path(".")
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:
        raise OutputPathError(f"{what} {path} cannot be written ({reason(e, parent)}); choose another path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result gets the permissions open() would give
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        Path(tmp).unlink(missing_ok=True)
        raise OutputPathError(f"{what} {path} cannot be written ({reason(e, parent)}); choose another path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Removes the temporary files of `path` that a killed run left (their process is gone); a link or a file of a
    process still running is left alone."""
    parent = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^/]*\.tmp$")
    try:
        candidates = [p for p in parent.iterdir() if pattern.match(p.name)]
    except OSError:
        return
    for p in candidates:
        pid = int(pattern.match(p.name).group(1))
        if p.is_symlink() or not p.is_file() or pid == os.getpid() or process_alive(pid):
            continue
        p.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _refuse_link(path: Path, what: str) -> None:
    if path.is_symlink():
        raise OutputPathError(f"{what} {path} is a symbolic link; give the path of a regular file (spot-compile does not "
                              "write through links)")


def _refuse_full(directory: Path, what: str) -> None:
    if _free_bytes(directory) < MIN_FREE_BYTES:
        raise OutputPathError(f"{what} cannot be written (no space left on device: {directory}); free some space or "
                              "choose another path")


def _free_bytes(directory: Path) -> int:
    try:
        stats = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs (Windows): nothing to say in advance
        return MIN_FREE_BYTES
    return stats.f_bavail * stats.f_frsize


def reason(e: BaseException, directory: Path) -> str:
    """Why writing into `directory` failed, in a few words: "no space left on device" for a full disk, whatever
    error surfaced it (torch.save's is a RuntimeError)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or _free_bytes(directory) < MIN_FREE_BYTES:
        return "no space left on device"
    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return "it is a symbolic link"
    return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
