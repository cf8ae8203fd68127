"""The one configuration object of the public API."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from spot_compile.errors import BudgetError, InputSizeError
from spot_compile.policies import policy_class, policy_names

# The best training-free policy measured on the shipped model (docs/results/policies/policies.md: merging stays within 0.3
# points of dense down to FLOPs 0.5, class attention loses 8.6 points at 0.6).
DEFAULT_POLICY = "merge"


@dataclass
class SparsifyConfig:
    """How to sparsify a ViT.

    budget: target cost as a fraction of the dense model's FLOPs at the same input, in (0, 1]. 1.0 leaves the
        model dense (bit-for-bit the captured graph).
    stages: block indices (0-based) in front of which tokens are reduced. Default: the policy's (every block after
        the first for "merge", as ToMe; the blocks at 1/4, 1/2 and 3/4 of the depth for the others, as DynamicViT/SPOT).
    policy: how tokens are reduced, a name in the policy registry (`spot_compile.policies`): "merge" (the default:
        ToMe-style merging, training-free), "class-attention" (training-free, EViT-like), "random" (a baseline) or
        "spot" (learned SPOT predictors; pass `predictors`).
    keep: explicit kept patch-token counts per stage; overrides `budget` when given.
    fuse_pruned: average the dropped tokens into one extra token (EViT-style) instead of discarding them (policies
        that drop tokens).
    input_size: image side (or (H, W)) of the example input; default read from the model where it declares one.
    predictors: path to a calibrated predictor checkpoint (policy "spot").
    """

    budget: float = 0.6
    stages: tuple[int, ...] | None = None
    policy: str = DEFAULT_POLICY
    keep: tuple[int, ...] | None = None
    fuse_pruned: bool = False
    input_size: int | tuple[int, int] | None = None
    predictors: str | None = None
    tolerance: float = field(default=0.02, repr=False)

    def __post_init__(self) -> None:
        self.budget = flops_fraction(self.budget, "budget")
        if not isinstance(self.policy, str) or self.policy not in policy_names():
            raise BudgetError(f"unknown policy {self.policy!r}; choose one of {', '.join(policy_names())}")
        if self.predictors is not None and not policy_class(self.policy).calibrated:
            raise BudgetError(f"predictors (--predictors) are read by policy 'spot', not by {self.policy!r}: drop them, or "
                              "choose --policy spot")
        if self.fuse_pruned and not policy_class(self.policy).fusable:
            raise BudgetError(f"fuse_pruned (--fuse) applies to policies that drop tokens, not to {self.policy!r}")
        if self.stages is not None:
            self.stages = tuple(sorted(set(_whole_numbers(self.stages, "stages", "block indices, e.g. (3, 6, 9)"))))
            if not self.stages:
                raise BudgetError("stages is empty; give at least one block index, e.g. --stages 3,6,9")
        if self.keep is not None:
            self.keep = _whole_numbers(self.keep, "keep", "token counts per stage, e.g. (100, 70, 50)")
            if any(k < 1 for k in self.keep):
                raise BudgetError(f"keep counts must be at least 1 token per stage, got {self.keep}")
        if self.input_size is not None:
            single = isinstance(self.input_size, (int, float, str))
            sizes = (self.input_size,) if single else self.input_size
            sizes = _whole_numbers(sizes, "input_size", "an image side or (H, W), e.g. 224")
            if len(sizes) not in (1, 2) or any(v < 1 for v in sizes):
                raise InputSizeError(f"input_size must be a positive image side or (H, W), got {self.input_size!r}")
            self.input_size = sizes[0] if single else sizes
        if not (isinstance(self.tolerance, (int, float)) and 0 < self.tolerance < 1):
            raise BudgetError(f"tolerance must be a fraction in (0, 1), got {self.tolerance!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def flops_fraction(value, name: str) -> float:
    """`value` as a float in (0, 1], a fraction of the dense model's FLOPs; a one-line BudgetError naming `name`
    (the argument, as the API calls it) for anything else."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):  # float(True) is 1.0: a flag passed where a fraction was meant
        raise BudgetError(f"{name} must be a number in (0, 1], got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise BudgetError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < value <= 1.0:
        raise BudgetError(f"{name} must be in (0, 1] (a fraction of the dense FLOPs), got {value}; e.g. {flag} 0.6")
    return value


def _whole_numbers(values, name: str, what: str) -> tuple[int, ...]:
    """`values` as a tuple of ints; a one-line error for anything else (a string, floats with a fraction, None)."""
    error = BudgetError if name != "input_size" else InputSizeError
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise error(f"{name} must be a sequence of whole numbers ({what}), got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise error(f"{name} must be whole numbers ({what}), got {values!r}")
        out.append(int(v))
    return tuple(out)

