"""The one configuration object of the public API."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from spot_compile.errors import BudgetError, InputSizeError
from spot_compile.policy_configs import PolicyConfig, config_type_named, unknown_policy

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
    policy: how tokens are reduced: a policy's config (`spot_compile.policy_configs`: `MergeConfig()`,
        `SpotConfig(predictors=...)`, ...) or its name in the policy registry: "merge" (the default: ToMe-style
        merging, training-free), "class-attention" (training-free, EViT-like), "random" (a baseline) or "spot"
        (learned SPOT predictors; pass `predictors`). Read back, it is always the name; the config with its
        settings is `policy_config`.
    keep: explicit kept patch-token counts per stage; overrides `budget` when given.
    fuse_pruned: shorthand for the dropping policies' `fuse` setting: average the dropped tokens into one extra
        token (EViT-style) instead of discarding them.
    input_size: image side (or (H, W)) of the example input; default read from the model where it declares one.
    predictors: shorthand for `SpotConfig(predictors=...)`: path to a calibrated predictor checkpoint.
    policy_config: set from the above (pass `policy=SomeConfig(...)` rather than this).
    """

    budget: float = 0.6
    stages: tuple[int, ...] | None = None
    policy: str = DEFAULT_POLICY
    keep: tuple[int, ...] | None = None
    fuse_pruned: bool = False
    input_size: int | tuple[int, int] | None = None
    predictors: str | None = None
    tolerance: float = field(default=0.02, repr=False)
    policy_config: PolicyConfig | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.budget = flops_fraction(self.budget, "budget")
        self.policy_config = self._policy_settings()
        self.policy = self.policy_config.name
        self.fuse_pruned = getattr(self.policy_config, "fuse", False)
        self.predictors = getattr(self.policy_config, "predictors", None)
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

    def _policy_settings(self) -> PolicyConfig:
        """The policy's config, with the flat shorthands (`fuse_pruned`, `predictors`) set in it. Given a config
        object, a shorthand that says otherwise is refused; given a name, the shorthands are the settings (which is
        also how `dataclasses.replace(config, predictors=...)` changes them)."""
        given, flat = self.policy, {"fuse": self.fuse_pruned, "predictors": self.predictors}
        defaults = {"fuse": False, "predictors": None}
        if isinstance(given, PolicyConfig):
            base = given
        elif (named := config_type_named(given)) is not None:
            kept = self.policy_config
            base = kept if isinstance(kept, PolicyConfig) and kept.name == given else named()
        else:
            raise BudgetError(unknown_policy(given))
        names = {f.name for f in fields(base)}
        updates = {}
        for key, value in flat.items():
            if key not in names:
                if value != defaults[key]:
                    raise BudgetError(_NOT_READ[key].format(policy=base.name))
            elif isinstance(given, PolicyConfig):
                if value != defaults[key] and value != getattr(base, key):
                    raise BudgetError(f"{_FLAT[key]} is {value!r} but the policy's config says {getattr(base, key)!r}; give it once")
            elif value != getattr(base, key):
                updates[key] = value
        return replace(base, **updates) if updates else base

    def to_dict(self) -> dict:
        """The settings as plain values: the policy's config as a dict of its own fields."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "policy_config"}
        out["policy_config"] = self.policy_config.settings()
        return out


_FLAT = {"fuse": "fuse_pruned (--fuse)", "predictors": "predictors (--predictors)"}
_NOT_READ = {
    "fuse": "fuse_pruned (--fuse) applies to policies that drop tokens, not to {policy!r}",
    "predictors": "predictors (--predictors) are read by policy 'spot', not by {policy!r}: drop them, or choose --policy spot",
}


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

