"""Choosing keep counts that meet a FLOPs budget: the default geometric schedule, the search over a schedule's keep
rate that counts real FLOPs, and the rough cost model that steers it.
"""

from __future__ import annotations

from collections.abc import Callable

from spot_compile.errors import BudgetError


def keep_schedule(patch_tokens: int, num_stages: int, rho: float, fuse: bool) -> tuple[int, ...]:
    """DynamicViT's schedule: stage s keeps rho**s of the patch tokens; counts never grow between stages."""
    keep, prev = [], patch_tokens
    for s in range(1, num_stages + 1):
        k = max(1, min(prev, round(patch_tokens * rho**s)))
        keep.append(k)
        prev = k + int(fuse)
    return tuple(keep)


def solve_keep(
    flops_of: Callable[[tuple[int, ...]], int], dense_flops: int, schedule: Callable[[float], tuple[int, ...]],
    budget: float, tolerance: float, estimate: Callable[[tuple[int, ...]], float],
) -> tuple[int, ...]:
    """A schedule (`schedule(rho)`: keep counts monotone in rho, every token at 1) that costs at most `budget` of
    the dense FLOPs: the first counted one in [budget - tolerance/4, budget], or, where no schedule lies in that
    band (few tokens), the costliest under budget.

    Every candidate is built and counted with the real counter, the slow part of `sparsify` (shape propagation,
    seconds a build), so the search counts few: it interpolates the counted ratios linearly in `estimate(keep)`, a
    rough cost of a schedule (`schedule_cost`) that only steers the search, and aims near the top of the accepted
    band. The first bracket's upper end is the dense model (ratio 1 with every token kept), which costs no build;
    only counted schedules are returned.
    """
    cache: dict[tuple[int, ...], float] = {}

    def ratio(keep: tuple[int, ...]) -> float:
        if keep not in cache:
            cache[keep] = flops_of(keep) / dense_flops
        return cache[keep]

    lo, lo_keep = 0.0, schedule(0.0)
    lo_r = ratio(lo_keep)
    if lo_r > budget:
        raise BudgetError(
            f"budget {budget} is unreachable with these stages: the fewest tokens this policy keeps there "
            f"({', '.join(map(str, lo_keep))}) still cost "
            f"{lo_r:.3f} of dense; raise the budget or reduce earlier or at more blocks (--stages)"
        )
    hi, hi_keep, hi_r = 1.0, schedule(1.0), 1.0
    goal = budget - tolerance / 16
    for _ in range(60):
        if budget - lo_r <= tolerance / 4 or hi - lo < 1e-6:
            break
        t = (goal - lo_r) / (hi_r - lo_r) if hi_r > lo_r else 0.5
        rho = _rho_for_cost(schedule, estimate, lo, hi, estimate(lo_keep) + t * (estimate(hi_keep) - estimate(lo_keep)))
        keep = schedule(rho)
        if keep in (lo_keep, hi_keep):  # the interpolation fell on a bracket end: split the bracket instead
            rho = (lo + hi) / 2
            keep = schedule(rho)
            if keep in (lo_keep, hi_keep):  # same schedule, same ratio: narrow the bracket without counting
                lo, hi = (rho, hi) if keep == lo_keep else (lo, rho)
                continue
        r = ratio(keep)
        if r <= budget:
            lo, lo_keep, lo_r = rho, keep, r
        else:
            hi, hi_keep, hi_r = rho, keep, r
    return lo_keep


def _rho_for_cost(schedule, estimate, lo: float, hi: float, want: float) -> float:
    """The rho in (lo, hi) whose schedule's estimated cost comes closest to `want` from below (costs grow with rho)."""
    a, b = lo, hi
    for _ in range(40):
        mid = (a + b) / 2
        if estimate(schedule(mid)) <= want:
            a = mid
        else:
            b = mid
    return a if a > lo else (a + b) / 2


def schedule_cost(stages: tuple[int, ...], depth: int, dim: int, special: int, fuse: bool) -> Callable[[tuple[int, ...]], float]:
    """A schedule's cost in the pruned blocks, up to a constant factor, for steering `solve_keep` (never reported):
    a block on n tokens of width d does about 24 d^2 n FLOPs in its linear layers and 4 d n^2 in attention."""
    blocks = [b - a for a, b in zip(stages, (*stages[1:], depth))]

    def cost(keep: tuple[int, ...]) -> float:
        return sum(b * (n + n * n / (6 * dim)) for b, n in zip(blocks, (special + k + int(fuse) for k in keep)))

    return cost
