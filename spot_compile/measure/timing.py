"""Wall-clock timing of callables side by side: the one way every latency figure in spot-compile is taken.

Callables are run round-robin, so that machine noise hits them all alike, and compared by their medians after
warm-up; `SparseViT.compiled` uses it to choose between compiled and eager, `bench` and `demo` to report ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def round_robin_ms(fns: Sequence[Callable], x: torch.Tensor, warmup: int, repeats: int) -> list[list[float]]:
    """ms of each call of each callable, the callables run round-robin so that machine noise hits them all alike:
    entry i of every list comes from the same round. Each round starts one callable later, so each takes every place
    in the order equally often: measured, the callable right after a large one ran ~3 ms slower at batch 64 (its
    caches were evicted), enough to bias a small difference between two cheap graphs."""
    times: list[list[float]] = [[] for _ in fns]
    n = len(fns)
    for i in range(warmup + repeats):
        for j in range(n):
            fn, acc = fns[(i + j) % n], times[(i + j) % n]
            t = time.perf_counter()
            fn(x)
            if x.is_cuda:  # kernels run asynchronously: the call is over when the device is done
                torch.cuda.synchronize()
            if i >= warmup:
                acc.append((time.perf_counter() - t) * 1e3)
    return times


def median_ms(fns: Sequence[Callable], x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Median ms of each callable, run round-robin (`round_robin_ms`)."""
    return [statistics.median(t) for t in round_robin_ms(fns, x, warmup, repeats)]


def median_pair(fns: Sequence[Callable], x: torch.Tensor, warmup: int, repeats: int) -> tuple[float, float]:
    """Median ms of two callables, run round-robin."""
    a, b = median_ms(fns, x, warmup, repeats)
    return a, b


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (the value itself, twice, for a single value)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# A ratio of two identical workloads further than this from 1.00 (and outside its own spread) marks the machine as
# too noisy to trust the ratios measured beside it.
NOISE_FLOOR = 0.03


@dataclass(frozen=True)
class Ratio:
    """The ratio of two callables' times taken in the same rounds: the median of the per-round ratios and their
    interquartile range (`low`-`high`), so that a figure carries its own spread."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, top: Sequence[float], bottom: Sequence[float]) -> Ratio:
        per_round = [a / b for a, b in zip(top, bottom)]
        return cls(statistics.median(per_round), *quartiles(per_round))

    def text(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"

    @property
    def too_noisy(self) -> bool:
        """For a ratio of identical workloads (which is 1 on a quiet machine): whether it strays from 1.00 beyond its
        own spread and by more than `NOISE_FLOOR`."""
        return not self.low <= 1.0 <= self.high and abs(self.median - 1.0) > NOISE_FLOOR
