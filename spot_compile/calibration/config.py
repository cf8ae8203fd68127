"""How to calibrate: `CalibrationConfig`, a frozen dataclass with nested groups, the one description of a calibration
that the API, the CLI and the recipes build. Every setting is checked when the config is made, so a run that could
not train is refused before any slow work (the capture, the compile).

`CalibrationConfig.from_flat` builds one from the flat keyword names that `calibrate` took before the config
existed (and that the CLI's options still carry): `FLAT_FIELDS` says in which group each lives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from spot_compile.config import flops_fraction
from spot_compile.errors import UsageError
from spot_compile.scorers.predictor_config import PredictorConfig

# How the calibration graph's keep mask passes gradient (`passes.soft_pruning` implements each; a test keeps the two
# lists equal). The first is the default.
MASK_GRADIENTS = ("block", "downstream", "full")

PRECISIONS = ("fp32", "bf16")
# Through which graph a fine-tune tunes the backbone; the first is the default.
FINETUNE_GRAPHS = ("deployed", "calibration")


@dataclass(frozen=True)
class Optimization:
    """The predictors' optimisation. `epochs` per phase; `max_steps` caps the optimizer steps of each phase; `noise`
    scales the Gumbel exploration noise on the scores; `seed` fixes the predictors' initialisation, the noise, the
    shuffle and the augmentation."""

    epochs: int = 1
    batch_size: int = 128
    lr: float = 3e-3
    max_steps: int | None = None
    noise: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, least in (("batch size", self.batch_size, 1), ("epochs", self.epochs, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise UsageError(f"{name} must be a whole number >= {least}, got {value!r}")
        _optional_count("max_steps", self.max_steps)
        _finite("lr", self.lr, positive=True)
        _finite("noise", self.noise)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UsageError(f"seed must be a whole number, got {self.seed!r}")


@dataclass(frozen=True)
class LossWeights:
    """Loss = cross-entropy + `logit_distill` * KL(teacher || student) + `token_distill` * token MSE + `keep_ratio` *
    keep-ratio loss (`calibration.losses`). Both distillation weights 0: no teacher runs."""

    logit_distill: float = 0.5
    token_distill: float = 0.0
    keep_ratio: float = 2.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _finite(f.name if f.name != "keep_ratio" else "keep_ratio_weight", getattr(self, f.name))

    @property
    def distills(self) -> bool:
        return bool(self.logit_distill or self.token_distill)


@dataclass(frozen=True)
class FineTune:
    """`enabled`: the backbone learns too, against a frozen copy of the dense model, at `backbone_lr`. `graph` (None:
    "deployed"): "deployed" tunes it after the predictors, through the sparse graph that will run; "calibration"
    tunes it with them, through the calibration graph."""

    enabled: bool = False
    graph: str | None = None
    backbone_lr: float = 1e-4

    def __post_init__(self) -> None:
        if self.graph is not None and not self.enabled:
            raise UsageError(f"a fine-tune graph ({self.graph!r}) is only used with finetune=True (--finetune); "
                             "add it, or leave the graph out")
        if self.graph is not None and self.graph not in FINETUNE_GRAPHS:
            raise UsageError(f"unknown fine-tune graph {self.graph!r}; choose {' or '.join(FINETUNE_GRAPHS)}")
        _finite("backbone_lr", self.backbone_lr, positive=True)

    @property
    def through(self) -> str | None:
        """The graph the backbone is tuned through, None when it is frozen."""
        return (self.graph or FINETUNE_GRAPHS[0]) if self.enabled else None

    @property
    def joint(self) -> bool:
        """The backbone learns with the predictors, through the calibration graph."""
        return self.through == "calibration"

    @property
    def after(self) -> bool:
        """The backbone learns after the predictors, through the deployed graph: a second phase."""
        return self.through == "deployed"


@dataclass(frozen=True)
class RunOptions:
    """Where and how the run goes. `out`: the predictor file (with `out.partial` to resume from and `out.jsonl`, the
    log); `save_every`: write the partial every that many steps too; `val_every`: validate every that many steps and
    keep the best check; `compile`: run the graphs under torch.compile; `workers`: loader processes (None: see
    `calibration.distributed.default_workers`); `device`: "cpu", "cuda", None (the GPU when there is one); `precision`
    "bf16": forward passes under autocast."""

    out: Path | None = None
    save_every: int | None = None
    val_every: int | None = None
    compile: bool = True
    workers: int | None = None
    device: str | None = "cpu"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _optional_count("save_every", self.save_every)
        _optional_count("val_every", self.val_every)
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; choose {' or '.join(PRECISIONS)}")
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))


@dataclass(frozen=True)
class Experimental:
    """Settings kept for the studies (docs/research/), not recommended: `mask_gradient`, where a score's gradient comes
    from (`passes.soft_pruning`); `backbone_from_scores` False, with a joint fine-tune, detaches the predictors'
    inputs from the backbone."""

    mask_gradient: str = MASK_GRADIENTS[0]
    backbone_from_scores: bool = True

    def __post_init__(self) -> None:
        if self.mask_gradient not in MASK_GRADIENTS:
            raise UsageError(f"unknown mask gradient {self.mask_gradient!r}; choose {' or '.join(MASK_GRADIENTS)}")


@dataclass(frozen=True)
class CalibrationConfig:
    """A calibration of SPOT predictors at `budget` (see `calibration.trainer.calibrate`).

    `rank_budget` (None: `budget`): the budget whose keep counts the predictors learn to rank at; validation, the
    deployed graph and its tune stay at `budget`. `stages`: the blocks to prune in front of (None: 1/4, 1/2, 3/4 of
    the depth). `input_size`: the image side, where the model does not declare it.
    """

    budget: float = 0.6
    rank_budget: float | None = None
    stages: tuple[int, ...] | None = None
    input_size: int | None = None
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    optim: Optimization = field(default_factory=Optimization)
    loss: LossWeights = field(default_factory=LossWeights)
    finetune: FineTune = field(default_factory=FineTune)
    run: RunOptions = field(default_factory=RunOptions)
    experimental: Experimental = field(default_factory=Experimental)

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", flops_fraction(self.budget, "budget"))
        if self.rank_budget is not None:
            object.__setattr__(self, "rank_budget", flops_fraction(self.rank_budget, "rank_budget"))
        if self.stages is not None:
            object.__setattr__(self, "stages", tuple(self.stages))
        if not self.experimental.backbone_from_scores and not self.finetune.joint:
            raise UsageError("backbone_from_scores=False only changes a backbone tuned with the predictors: use it with "
                             "finetune=True, finetune_graph='calibration'")

    @property
    def ranking_budget(self) -> float:
        return self.budget if self.rank_budget is None else self.rank_budget

    @property
    def phases(self) -> tuple[str, ...]:
        return ("calibrate", "tune") if self.finetune.after else ("calibrate",)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run"]["out"] = str(self.run.out) if self.run.out is not None else None
        return d

    @classmethod
    def from_flat(cls, **settings) -> CalibrationConfig:
        """A config from flat keyword names (`FLAT_FIELDS`: `epochs`, `finetune`, `keep_ratio_weight`, ...), the
        rest at their defaults; an unknown name is a UsageError naming it."""
        return cls().with_flat(**settings)

    def with_flat(self, **settings) -> CalibrationConfig:
        """This config with the settings named flat changed, each group rebuilt once (so that settings checked
        together, such as `finetune` and `finetune_graph`, change together)."""
        unknown = sorted(set(settings) - set(FLAT_FIELDS))
        if unknown:
            raise UsageError(f"unknown calibration setting(s) {', '.join(unknown)}; the settings are {', '.join(FLAT_FIELDS)}")
        top: dict = {}
        groups: dict[str, dict] = {}
        for name, value in settings.items():
            group, attr = FLAT_FIELDS[name]
            (groups.setdefault(group, {}) if group else top)[attr] = value
        return replace(self, **top, **{g: replace(getattr(self, g), **values) for g, values in groups.items()})


# flat name -> (group, field); "" is the config itself
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    "budget": ("", "budget"), "rank_budget": ("", "rank_budget"), "stages": ("", "stages"), "input_size": ("", "input_size"),
    "predictor": ("", "predictor"),
    "epochs": ("optim", "epochs"), "batch_size": ("optim", "batch_size"), "lr": ("optim", "lr"),
    "max_steps": ("optim", "max_steps"), "noise": ("optim", "noise"), "seed": ("optim", "seed"),
    "logit_distill": ("loss", "logit_distill"), "token_distill": ("loss", "token_distill"),
    "keep_ratio_weight": ("loss", "keep_ratio"),
    "finetune": ("finetune", "enabled"), "finetune_graph": ("finetune", "graph"), "backbone_lr": ("finetune", "backbone_lr"),
    "out": ("run", "out"), "save_every": ("run", "save_every"), "val_every": ("run", "val_every"), "compile": ("run", "compile"),
    "workers": ("run", "workers"), "device": ("run", "device"), "precision": ("run", "precision"),
    "mask_gradient": ("experimental", "mask_gradient"), "backbone_from_scores": ("experimental", "backbone_from_scores"),
}


def _optional_count(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise UsageError(f"{name} must be a whole number >= 1 (or None), got {value!r}")


def _finite(name: str, value, positive: bool = False) -> None:
    """`value` a finite number, >= 0 (> 0 with `positive`): a NaN or an infinity would train NaN predictors."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise UsageError(f"{name} must be a finite number {bound}, got {value!r}")
