"""How a long training run reports itself: a rate on the progress bar, plain periodic lines where stdout is not a
terminal (a cluster job's log file, where a live bar prints nothing until the end), and a JSON-lines record of every
step and validation that a person or a plot can read afterwards."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

from spot_compile.errors import OutputPathError
from spot_compile.serialization.files import reason


class RunLog:
    """Step and validation records of one run. `path` (JSON lines) is appended to when `resumed`, else started anew;
    `every_s`: seconds between plain progress lines on a console that is not a terminal."""

    def __init__(self, console: Console, path: Path | None, total_steps: int, batch_size: int, *, resumed: bool,
                 every_s: float = 30.0) -> None:
        self.console, self.total, self.batch_size, self.every_s = console, total_steps, batch_size, every_s
        self.path, self.file = path, _open_log(path, resumed) if path is not None else None
        self.start = self.last_line = time.perf_counter()
        self.steps_here = 0  # steps run by this process: the rate is this process's own
        self.timed_from: float | None = None  # the end of this process's first step, which includes the compile

    def images_per_s(self) -> float:
        """This process's rate over its steps after the first, so that neither the rate nor the ETA counts the
        compile the first step pays for (0 until a second step is done)."""
        if self.timed_from is None or self.steps_here < 2:
            return 0.0
        elapsed = time.perf_counter() - self.timed_from
        return (self.steps_here - 1) * self.batch_size / elapsed if elapsed > 0 else 0.0

    def step(self, step: int, epoch: int, metrics: dict) -> None:
        """After optimizer step `step` (1-based): one JSON line, and a plain line now and then off a terminal."""
        self.steps_here += 1
        if self.steps_here == 1:
            self.timed_from = time.perf_counter()
        rate = self.images_per_s()
        self._write({"step": step, "epoch": epoch, **metrics, "images_per_s": rate})
        now = time.perf_counter()
        if not self.console.is_terminal and (now - self.last_line >= self.every_s or step == self.total):
            self.last_line = now
            left = (self.total - step) * self.batch_size / rate if rate > 0 else float("nan")
            phase = "tune epoch" if metrics.get("phase") == "tune" else "epoch"
            self.console.print(f"step {step}/{self.total} ({100 * step / self.total:.0f} %), {phase} {epoch}, "
                               f"loss {metrics['loss']:.4f}, {rate:.1f} img/s, ETA {_duration(left)}", highlight=False)

    def validation(self, record: dict) -> None:
        self._write({"validation": record})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def _write(self, record: dict) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk mid-run: the run stops here, its last partial checkpoint kept
                raise OutputPathError(f"the log {self.path} cannot be written ({reason(e, self.path.parent)}); the run "
                                      "stopped, its last partial checkpoint is kept: free some space and start it again") from None


def _open_log(path: Path, resumed: bool):
    """The log opened for appending (a resumed run) or anew, never through a link planted at its name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if resumed else os.O_TRUNC)
    try:
        return os.fdopen(os.open(path, flags, 0o666), "a" if resumed else "w")
    except OSError as e:
        raise OutputPathError(f"the log {path} cannot be written ({reason(e, path.parent)}); remove it or choose another --out") from None


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no step timed yet
        return "?"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"
