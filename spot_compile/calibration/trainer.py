"""Calibrating SPOT predictors: a short fine-tuning of the predictors against the dense model (`calibrate`), run by
a `Calibrator` whose phases are its methods: setting up (`__init__`: the graphs, the optimizer, the data, a resumed
state), training an epoch (`train_epoch`, one `step` at a time), validating (`validate`), writing the partial
checkpoint (`save_partial`) and finishing (`finish`: the best check restored, the table, the predictor file).

The student is the calibration graph (`passes.soft_pruning`): the same stages and static keep counts as inference,
with a straight-through top-k mask, masked attention in each stage's block and the kept tokens gathered after it; the
loss is `calibration.losses`'. By default the backbone stays frozen and only the predictors learn. With a fine-tune
the backbone learns too, against a frozen copy of the dense model as teacher, so that it adapts to seeing fewer
tokens, and the tuned backbone travels in the predictor file: "deployed" (the default) calibrates the predictors on
the frozen backbone first, then tunes the backbone for as many steps again through the sparse graph that will run,
with those predictors fixed (loss: cross-entropy + the logit KL); "calibration" tunes it in the same steps as the
predictors, through the calibration graph; docs/spot.md says which to choose and why. Accuracy each epoch is
measured with the real pruned graph on a validation split of the training set.

The module is longer than the others because the trainer is one class: its phases share the run's state (graphs,
optimizers, the step, the best check), which split across modules would be passed back and forth instead.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from spot_compile.api import SparseViT, sparsify
from spot_compile.calibration.config import CalibrationConfig
from spot_compile.calibration.distributed import Processes, default_workers, local_rank, resolve_device
from spot_compile.calibration.losses import TERMS, calibration_loss
from spot_compile.calibration.resume import RunLock, data_identity, read_partial, rng_state, set_rng_state, write_partial
from spot_compile.calibration.runlog import RunLog
from spot_compile.calibration.schedule import cosine_lr
from spot_compile.config import SparsifyConfig
from spot_compile.data.imageset import ImageSet, as_dataset, classes_of, images_per_class
from spot_compile.data.loading import Prepared, SeededSampler, loader, reraised
from spot_compile.data.preprocessing import Preprocessing, model_preprocessing
from spot_compile.data.transforms import EvalTransform, TrainTransform
from spot_compile.errors import BudgetError, CheckpointError, DataError, UsageError, first_line
from spot_compile.graph.blocks import find_blocks
from spot_compile.graph.capture import capture, clone_graph_module
from spot_compile.graph.inputs import dtype_of, example_input
from spot_compile.measure.accuracy import logits_of, top1_correct
from spot_compile.passes.soft_pruning import build_calibration_graph, tap_final_tokens
from spot_compile.policies import default_stages
from spot_compile.policy_configs import GivenScorersConfig
from spot_compile.scorers.spot import make_predictors
from spot_compile.serialization.checkpoints import fingerprint
from spot_compile.serialization.files import check_writable_file
from spot_compile.serialization.predictors import PredictorCheckpoint, save_predictors

# Fewer optimizer steps than this in a phase draw a warning: the predictors barely leave their initialisation.
FEW_STEPS = 20


@dataclass
class CalibrationResult:
    checkpoint: PredictorCheckpoint
    sparse: SparseViT
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def calibrate(model: nn.Module, train: Dataset | ImageSet, val: Dataset | ImageSet, config: CalibrationConfig | None = None, *,
              console: Console | None = None, preprocessing: Preprocessing | None = None, **settings) -> CalibrationResult:
    """Trains one SPOT predictor per stage for `model` at `config.budget` (`CalibrationConfig`; the module docstring
    says what learns and how).

    `train` and `val` are Datasets of (image, label) pairs, images as PIL images or [0, 1] tensors
    (`data.datasets.training_datasets` reads IDX directories and ImageFolder trees so), or in-memory `ImageSet`s.
    They go through `preprocessing`, by default the model's own (`data.preprocessing.model_preprocessing`:
    normalisation, resize and crop, and the declared training augmentation, printed at the start).

    Under torchrun (`torchrun --nproc-per-node N -m spot_compile calibrate ...`, or a process group the caller
    joined), the student trains under DistributedDataParallel: the batch size is per process, the global batch is
    N x batch size, the learning rates are used as given. Rank 0 alone prints and writes; validation is shared out.
    With a fine-tune, `model`'s own parameters are updated in place (and the model is moved to the device).

    With `config.run.out`, a partial checkpoint `<out>.partial` is written (atomically) after every epoch and, with
    `save_every`, every that many steps; a run started again with the same settings resumes from it exactly
    (predictors, optimizer, schedule, the epoch's shuffle and position, every process's random generators), also
    when it was killed mid-epoch. With `val_every`, the predictors (and tuned backbone) of the best validation are
    returned rather than the last.

    Deprecated: the settings as flat keywords (`calibrate(model, train, val, 0.6, epochs=2, finetune=True)`), as
    before the config existed; they are read by `CalibrationConfig.from_flat`.
    """
    return Calibrator(model, train, val, _config_from(config, settings), console=console, preprocessing=preprocessing).run()


def _config_from(config, settings: dict) -> CalibrationConfig:
    if isinstance(config, CalibrationConfig):
        if settings:
            raise UsageError(f"give the settings in the CalibrationConfig, not beside it ({', '.join(settings)})")
        return config
    if config is not None:  # the budget, passed by position before the config existed
        settings = {"budget": config, **settings}
    if settings:
        warnings.warn("calibrate(model, train, val, budget, **settings) is deprecated: pass "
                      "calibrate(model, train, val, CalibrationConfig(...))", DeprecationWarning, stacklevel=3)
    return CalibrationConfig.from_flat(**settings)


class Calibrator:
    """One calibration run, from its setup to the predictor file. See `calibrate`."""

    def __init__(self, model: nn.Module, train, val, config: CalibrationConfig, *, console: Console | None = None,
                 preprocessing: Preprocessing | None = None) -> None:
        self.config, self.model = config, model
        run = config.run
        self.device = resolve_device(run.device, local_rank())
        self.procs = Processes.from_env(self.device)
        self.console = console or Console() if self.procs.main else Console(quiet=True)
        if dtype_of(model) != torch.float32:
            raise UsageError(f"calibrate trains a float32 model (its weights are {dtype_of(model)}); calibrate model.float() "
                             "(--precision bf16 runs the forward passes in bfloat16), then sparsify the model in its own dtype")
        self.train_data, self.val_data = as_dataset(train), as_dataset(val)
        _check_data(self.train_data, self.val_data, config.optim.batch_size, self.procs.world_size)
        self.out = check_writable_file(run.out, "--out") if run.out is not None else None
        self.partial = self.out.with_suffix(".partial") if self.out else None
        self.lock = RunLock(self.out) if self.out and self.procs.main else None
        if self.lock:
            self.lock.acquire()
        try:
            self._setup(model, preprocessing)
        except BaseException:
            if self.lock:
                self.lock.release()
            raise

    def _setup(self, model: nn.Module, preprocessing: Preprocessing | None) -> None:
        config = self.config
        torch.manual_seed(config.optim.seed)
        model.to(self.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.example = example_input(model, config.input_size)
        self.preprocessing = preprocessing or model_preprocessing(model, int(self.example.shape[1]), tuple(self.example.shape[-2:]))
        self._check_model()
        self._build_graphs()
        self._build_optimizer()
        self._build_data()
        self.history: list[dict] = []
        self.start_epoch = self.step_count = 0
        # With val_every: the best validation so far, and a copy of what made it (restored at the end if not the last).
        self.best: dict = {"top1": -1.0, "step": 0, "predictors": None, "backbone": None, "checks": []}
        self.tuner: dict = {}  # the backbone's tune through the deployed graph: built when its phase starts
        self.identity = self._identity()
        self.resume = self._resume() if self.partial and self.partial.exists() else None

    # --- setup ---------------------------------------------------------------------------------------------------

    def _check_model(self) -> None:
        """Bad data and a model without tensor logits are refused now, not after the compile (minutes)."""
        self.train_set = Prepared(self.train_data, TrainTransform(self.preprocessing))
        self.val_set = Prepared(self.val_data, EvalTransform(self.preprocessing))
        with torch.no_grad():
            _ = self.train_set[0], self.val_set[0]
            self.classes = logits_of(self.model(self.example)).shape[-1]
        self.named = classes_of(self.train_data)
        if self.named is not None and len(self.named) != self.classes:
            raise DataError(f"the data has {len(self.named)} classes but the model's head gives {self.classes} logits; "
                            "calibrate on data with the classes the model was trained on, in its order")

    def _build_graphs(self) -> None:
        """The teacher, the predictors, the deployed graph at the budget and the calibration graph at the ranking
        budget's keep counts, with their compiled runners."""
        cfg, model, example = self.config, self.model, self.example
        captured = capture(model, example)
        # The teacher must stay the dense model the user brought, also while the backbone under it is being tuned.
        self.distill = cfg.loss.distills  # without distillation no teacher runs: a step is that much cheaper
        teacher = (capture(copy.deepcopy(model), example) if cfg.finetune.enabled else clone_graph_module(captured)) if self.distill else None
        self.teacher_tokens = tap_final_tokens(teacher) if self.distill else None
        self.structure = find_blocks(captured)
        self.stages = cfg.stages or default_stages(len(self.structure.blocks))
        self.predictors = make_predictors(self.structure, self.stages, cfg.predictor, seed=cfg.optim.seed)
        for m in self.predictors.values():
            m.to(self.device)
        self.sparse = self._sparsified(cfg.budget)
        try:
            ranking = self.sparse if cfg.ranking_budget == cfg.budget else self._sparsified(cfg.ranking_budget)
        except BudgetError as e:
            raise BudgetError(f"--rank-budget {cfg.ranking_budget}: {e}") from None
        self.keep = tuple(s.keep for s in ranking.plan.stages)  # the calibration graph's
        scorers = self.predictors if cfg.experimental.backbone_from_scores else {s: DetachedInputs(m) for s, m in self.predictors.items()}
        self.student, self.keepers = build_calibration_graph(captured, self.stages, self.keep, scorers, cfg.optim.noise,
                                                             cfg.experimental.mask_gradient)
        self.targets, alive = [], self.structure.tokens - self.structure.num_special
        for k in self.keep:
            self.targets.append(k / alive)
            alive = k
        self.backbone = list(model.parameters())
        if cfg.finetune.joint:  # before DDP wraps the student: it synchronises only what requires grad when it is built
            for p in self.backbone:
                p.requires_grad_(True)
        self.run_student = self._runner(self.student)
        self.run_teacher = (torch.compile(teacher) if cfg.run.compile else teacher) if self.distill else None

    def _sparsified(self, budget: float) -> SparseViT:
        policy = GivenScorersConfig(scorers=self.predictors)
        return sparsify(self.model, SparsifyConfig(budget=budget, stages=self.stages, policy=policy, input_size=self.config.input_size))

    def _runner(self, graph: nn.Module):
        """`graph` as it trains: under DistributedDataParallel on several processes, under torch.compile if asked."""
        if self.procs.world_size > 1:
            graph = DistributedDataParallel(graph, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(graph) if self.config.run.compile else graph

    def _build_optimizer(self) -> None:
        cfg = self.config
        groups = [{"params": [p for m in self.predictors.values() for p in m.parameters()], "base_lr": cfg.optim.lr}]
        if cfg.finetune.joint:
            groups.append({"params": self.backbone, "base_lr": cfg.finetune.backbone_lr})
        self.opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=0.01)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.run.precision == "bf16")

    def _build_data(self) -> None:
        cfg, procs, pin = self.config, self.procs, self.device.type == "cuda"
        workers = default_workers(self.device) if cfg.run.workers is None else cfg.run.workers
        batch_size = cfg.optim.batch_size
        self.sampler = SeededSampler(self.train_data, procs.world_size, procs.rank, cfg.optim.seed)
        self.train_loader = loader(self.train_set, batch_size, sampler=self.sampler, workers=workers, pin_memory=pin, drop_last=True)
        mine = list(range(procs.rank, len(self.val_data), procs.world_size))  # each process validates every world-th image
        self.val_loader = loader(Subset(self.val_set, mine), max(batch_size, 256), workers=workers, pin_memory=pin)
        self.steps_per_epoch = self.sampler.num_samples // batch_size  # full batches only: a ragged last batch would recompile
        every = self.steps_per_epoch * cfg.optim.epochs
        self.total = min(cfg.optim.max_steps or every, every)  # steps per phase

    def _identity(self) -> dict:
        """What a partial checkpoint must have been made for to be resumed here: the same model, budget, stages and
        setup. In its JSON form (tuples as lists), as it is read back from a partial."""
        cfg = self.config
        identity = {"fingerprint": fingerprint(self.model, self.structure), "budget": cfg.budget, "rank_budget": cfg.ranking_budget,
                    "stages": list(self.stages), "keep": list(self.keep), "predictor": asdict(cfg.predictor),
                    **{f"{group}.{k}": v for group in ("optim", "loss", "finetune", "experimental")
                       for k, v in asdict(getattr(cfg, group)).items()},
                    "val_every": cfg.run.val_every, "precision": cfg.run.precision,
                    "device": self.device.type, "world_size": self.procs.world_size,
                    "training images": data_identity(self.train_data), "validation images": data_identity(self.val_data),
                    "preprocessing": self.preprocessing.describe()}
        return json.loads(json.dumps(identity))

    def _resume(self) -> dict:
        """Loads the partial checkpoint into the run; returns where in its epoch it stopped."""
        state = read_partial(self.partial, self.identity)
        try:
            for s, m in self.predictors.items():
                m.load_state_dict(state["predictors"][s])
            if self.config.finetune.enabled:
                self.model.load_state_dict(state["backbone"])
            if int(state["opt_phase"]) == 1:
                self.start_tuning(fresh=False)
                self.tuner["opt"].load_state_dict(state["opt"])
            else:
                self.opt.load_state_dict(state["opt"])
            self.history, self.start_epoch, self.step_count = json.loads(state["history"]), int(state["epoch"]), int(state["step"])
            if state.get("best") is not None:
                best = state["best"]
                self.best = {**best, "top1": float(best["top1"]), "step": int(best["step"]), "checks": json.loads(best["checks"])}
            resume = {"batch": int(state["batch"]), "rng": state["rng"][self.procs.rank], "sums": json.loads(state["sums"]),
                      "n": int(state["n"])}
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.partial} is a damaged partial calibration ({first_line(e)}); delete it to start afresh") from None
        self.console.print(f"resuming calibration at step {self.step_count} (epoch {self.start_epoch + 1}, batch {resume['batch']})")
        return resume

    def start_tuning(self, fresh: bool) -> None:
        """Freezes the predictors and makes the backbone trainable through the deployed graph (which shares the model's
        parameters): its optimizer, and the graph that trains, under DDP and compile as the student. `fresh`: the
        phase starts now, from the predictors of the best validation when `val_every` kept one."""
        if fresh and self.config.run.val_every and self.best["predictors"] is not None:
            for s, m in self.predictors.items():
                m.load_state_dict(self.best["predictors"][s])
        for m in self.predictors.values():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        for p in self.backbone:
            p.requires_grad_(True)
        lr = self.config.finetune.backbone_lr
        self.tuner["opt"] = torch.optim.AdamW([{"params": self.backbone, "base_lr": lr}], lr=lr, weight_decay=0.01)
        self.tuner["run"] = self._runner(self.sparse.graph_module)

    # --- the run -------------------------------------------------------------------------------------------------

    def run(self) -> CalibrationResult:
        try:
            return self._run()
        finally:
            if self.lock:
                self.lock.release()

    def _run(self) -> CalibrationResult:
        cfg, phases = self.config, self.config.phases
        # once every setting and file is accepted, before the first step
        counts = ", ".join(f"{c} {n}" for c, n in images_per_class(self.train_data).items())
        self.console.print(f"{len(self.train_data)} training images ({counts}), {len(self.val_data)} for validation", highlight=False)
        self.console.print(self.preprocessing.describe())
        if self.total < FEW_STEPS:
            self.console.print(f"[yellow]warning:[/] {self.total} optimizer step{'s' if self.total > 1 else ''} per phase "
                               f"({len(self.train_data)} training images, batch {cfg.optim.batch_size} x {self.procs.world_size} "
                               f"process(es), {cfg.optim.epochs} epoch(s)): too few for the predictors to learn much; add "
                               "images, lower --batch-size or raise --epochs", highlight=False)
        # The bar to beat: what the model brought scores on the same validation images, before any step.
        with self.autocast:
            self.dense_top1 = _top1(self.model, self.val_loader, self.device, self.procs, len(self.val_data))
        self.console.print(f"validation top-1 of the dense model: {self.dense_top1:.2f}%")
        self.t0 = time.time()
        self.log = RunLog(self.console, self.out.with_suffix(".jsonl") if self.out and self.procs.main else None, self.total * len(phases),
                          cfg.optim.batch_size * self.procs.world_size, resumed=self.resume is not None)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False, disable=not self.procs.main) as progress:
            self.progress = progress
            self.task = progress.add_task("calibrating", total=self.total * len(phases), completed=self.step_count, rate="")
            # Phase p ("calibrate", then "tune") owns epochs [p * epochs, (p + 1) * epochs) and steps [p * total, (p + 1) * total).
            for epoch in range(self.start_epoch, cfg.optim.epochs * len(phases)):
                self.train_epoch(epoch)
        self.log.close()
        return self.finish()

    def train_epoch(self, epoch: int) -> None:
        """Epoch `epoch` (counted over both phases), from where a resumed run stopped in it; then a validation and
        the partial checkpoint."""
        epochs = self.config.optim.epochs
        phase = epoch // epochs
        end = self.total * (phase + 1)
        if self.step_count >= end:
            return  # max_steps ended this phase before its last epoch
        if phase == 1 and not self.tuner:
            self.start_tuning(fresh=True)
        self.train_mode()
        # every report (console, JSON lines, table) counts epochs within their phase and names the phase
        within = epoch - phase * epochs + 1
        name = f"tune epoch {within}" if phase else f"epoch {within}"
        sums, n, first = dict.fromkeys(TERMS, 0.0), 0, 0
        if self.resume is not None and epoch == self.start_epoch:
            if self.resume["batch"]:
                sums, n, first = self.resume["sums"], self.resume["n"], self.resume["batch"]
            set_rng_state(self.resume["rng"], self.device)
        self.sampler.start(epoch, first * self.config.optim.batch_size)
        for i, (x, y) in enumerate(reraised(self.train_loader), first):
            if self.step_count >= end:
                break
            parts = self.step(x, y, phase)
            for key, v in parts.items():
                sums[key] += v
            n += 1
            self.progress.update(self.task, advance=1, description=f"{name} loss {sums['loss'] / n:.3f}",
                                 rate=f"{self.log.images_per_s():.1f} img/s")
            self._log_step(within, phase, parts)
            self._between_steps(epoch, i, end, sums, n)
        top1 = self.validate()
        self.keep_if_best(top1)
        for m in self.predictors.values():
            m.eval()
        row = {"epoch": within, "phase": self.config.phases[phase], **{k: v / max(n, 1) for k, v in sums.items()}, "val_top1": top1}
        self.history.append(row)
        self.log.validation(row)
        self.progress.console.print(f"{name}: loss {row['loss']:.3f}  val top-1 (pruned) {row['val_top1']:.2f}%")
        if self.partial:
            self.save_partial(epoch + 1, 0, {}, 0)

    def step(self, x: torch.Tensor, y: torch.Tensor, phase: int) -> dict[str, float]:
        """One optimizer step on the batch (x, y); the loss terms averaged over the processes."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.named is None and int(y.max()) >= self.classes:
            raise DataError(f"label {int(y.max())} in the data, but the model's head gives {self.classes} logits; "
                            "calibrate on data with the classes the model was trained on")
        tuning = bool(self.tuner)
        optimizer = self.tuner["opt"] if tuning else self.opt
        for g in optimizer.param_groups:
            g["lr"] = cosine_lr(self.step_count - phase * self.total, self.total, warmup=max(1, self.total // 20), base=g["base_lr"])
        with torch.no_grad(), self.autocast:
            teacher = logits_of(self.run_teacher(x)).float() if self.distill else None
        with self.autocast:
            logits = logits_of((self.tuner["run"] if tuning else self.run_student)(x)).float()
        # The deployed graph keeps exactly its static counts and taps no tokens: no keep-ratio or token loss.
        terms = calibration_loss(
            logits, y, teacher, self.config.loss,
            keep_ratios=() if tuning else [(self.keepers[s].soft_ratio, t) for s, t in zip(self.stages, self.targets)],
            tokens=None if tuning or not self.config.loss.token_distill else
            (self.student.spot_final_tokens.value.float(), self.teacher_tokens.value.float(), [self.keepers[s] for s in self.stages],
             self.structure.num_special))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        # one all-reduce of five numbers: the log shows the global batch's losses, not rank 0's share
        values = self.procs.mean(torch.stack([terms[k] for k in TERMS]).detach().float()).tolist()
        self.step_count += 1
        return dict(zip(TERMS, values))

    def _log_step(self, epoch: int, phase: int, parts: dict[str, float]) -> None:
        """One JSON line for the step just taken; `epoch` counts from 1 within `phase`."""
        optimizer = self.tuner["opt"] if self.tuner else self.opt
        # the keep-ratio loss is "ratio_loss" in the log, apart from the keep ratios themselves
        ratios = {} if self.tuner else {"keep_ratio": {str(s): float(self.keepers[s].soft_ratio.detach().mean()) for s in self.stages}}
        self.log.step(self.step_count, epoch, {**{k: v for k, v in parts.items() if k != "ratio"}, "ratio_loss": parts["ratio"],
                                                   "lr": [g["lr"] for g in optimizer.param_groups],
                                                   "phase": self.config.phases[phase], **ratios})

    def _between_steps(self, epoch: int, i: int, end: int, sums: dict, n: int) -> None:
        """After batch `i` of `epoch`: a validation every `val_every` steps, a partial every `save_every` (the epoch's
        last step is validated and saved after the loop)."""
        step, run = self.step_count, self.config.run
        if run.val_every and step % run.val_every == 0 and step < end and i + 1 < self.steps_per_epoch:
            top1 = self.validate()
            self.keep_if_best(top1)
            self.log.validation({"step": step, "val_top1": top1})
            self.progress.console.print(f"step {step}: val top-1 (pruned) {top1:.2f}%")
        if self.partial and run.save_every and step % run.save_every == 0 and step < end:
            self.save_partial(epoch, i + 1, sums, n)

    def train_mode(self) -> None:
        """The graph that learns in train mode; the predictors too while they learn (exploration noise)."""
        (self.sparse if self.tuner else self.student).train()
        for m in self.predictors.values():
            m.train(not self.tuner)

    def validate(self) -> float:
        """Top-1 % of the pruned model on the validation data, shared out over the processes (every process must call it)."""
        self.sparse.eval()
        for m in self.predictors.values():
            m.eval()
        with self.autocast:
            top1 = _shared_accuracy(self.sparse, self.val_loader, self.device, self.procs, len(self.val_data))
        self.train_mode()
        return top1

    def keep_if_best(self, top1: float) -> None:
        self.best["checks"].append({"step": self.step_count, "val_top1": top1})
        if self.config.run.val_every and top1 > self.best["top1"]:
            self.best.update(top1=top1, step=self.step_count,
                             predictors={s: copy.deepcopy(m.state_dict()) for s, m in self.predictors.items()},
                             backbone=copy.deepcopy(self.model.state_dict()) if self.config.finetune.enabled else None)

    def save_partial(self, epoch: int, batch: int, sums: dict, n: int) -> None:
        """Everything a resumed run needs to continue as if never stopped: `batch` is how many batches of `epoch`
        were trained (its shuffle is drawn again from the seed and the epoch), and each process's generators."""
        rng = self.procs.gather(rng_state(self.device))  # a collective: every process takes part, rank 0 writes
        if self.procs.main:
            best = self.best
            write_partial(self.partial, self.identity, {
                "predictors": {s: m.state_dict() for s, m in self.predictors.items()},
                "opt": (self.tuner["opt"] if self.tuner else self.opt).state_dict(), "opt_phase": 1 if self.tuner else 0,
                "backbone": self.model.state_dict() if self.config.finetune.enabled else None,
                "history": json.dumps(self.history), "epoch": epoch, "batch": batch, "step": self.step_count, "rng": rng,
                "sums": json.dumps(sums), "n": n, "best": {**best, "checks": json.dumps(best["checks"])}})

    # --- the end -------------------------------------------------------------------------------------------------

    def finish(self) -> CalibrationResult:
        """The best check's weights where `val_every` kept one, the table, and the predictor file."""
        cfg, model, best = self.config, self.model, self.best
        seconds = time.time() - self.t0
        finetune = cfg.finetune.enabled
        if cfg.run.val_every and best["predictors"] is not None and best["step"] != self.step_count:
            for s, m in self.predictors.items():
                m.load_state_dict(best["predictors"][s])
            if finetune:
                model.load_state_dict(best["backbone"])
            self.console.print(f"kept the predictors{' and backbone' if finetune else ''} of step {best['step']}: validation "
                               f"top-1 {best['top1']:.2f}% against {best['checks'][-1]['val_top1']:.2f}% after the last step")
        for p in model.parameters():
            p.requires_grad_(False)
        differ = self.procs.largest_difference([p for m in self.predictors.values() for p in m.parameters()] +
                                               (list(model.parameters()) if finetune else []))
        self._print_table(seconds, differ)
        ckpt = PredictorCheckpoint(self.predictors, tuple(self.stages), cfg.budget, cfg.predictor, self._metrics(seconds, differ),
                                   backbone={k: v.detach().clone() for k, v in model.state_dict().items()} if finetune else None)
        if self.out and self.procs.main:
            save_predictors(self.out, ckpt, model, self.structure)
            if self.partial:
                self.partial.unlink(missing_ok=True)
        self.procs.barrier()  # no process leaves before the checkpoint is written
        self.procs.close()
        return CalibrationResult(ckpt, self.sparse, self.history, seconds)

    def _metrics(self, seconds: float, differ: float) -> dict:
        cfg = self.config
        return {"history": self.history, "seconds": seconds, "dense_val_top1": self.dense_top1, "keep": list(self.keep),
                "rank_budget": cfg.ranking_budget,
                "finetune": cfg.finetune.enabled, "finetune_graph": cfg.finetune.through,
                "token_distill": cfg.loss.token_distill, "logit_distill": cfg.loss.logit_distill,
                "world_size": self.procs.world_size, "global_batch": cfg.optim.batch_size * self.procs.world_size,
                "rank_weight_difference": differ, "precision": cfg.run.precision,
                "mask_gradient": cfg.experimental.mask_gradient, "val_every": cfg.run.val_every,
                "keep_ratio_weight": cfg.loss.keep_ratio,
                "selected_step": self.best["step"] if cfg.run.val_every else self.step_count, "val_checks": self.best["checks"]}

    def _print_table(self, seconds: float, differ: float) -> None:
        cfg, console = self.config, self.console
        tuned = (f"backbone tuned ({'jointly' if cfg.finetune.joint else 'after, through the deployed graph'})"
                 if cfg.finetune.enabled else "backbone frozen")
        ranked = (f"ranked at budget {cfg.ranking_budget} (patch tokens kept {list(self.keep)})" if cfg.ranking_budget != cfg.budget
                  else f"patch tokens kept {list(self.keep)}")
        table = Table(title=f"calibration: budget {cfg.budget}, stages {list(self.stages)}, {ranked}, {tuned}; "
                            f"dense model {self.dense_top1:.2f}% on the validation images")
        for col in ("epoch", "phase", "loss", "CE", "KL", "tokens", "keep-ratio", "val top-1 % (pruned)"):
            table.add_column(col)
        for r in self.history:
            table.add_row(str(r["epoch"]), r.get("phase", "calibrate"), f"{r['loss']:.4f}", f"{r['ce']:.4f}", f"{r['kl']:.4f}",
                          f"{r.get('tok', 0.0):.4f}", f"{r['ratio']:.5f}", f"{r['val_top1']:.2f}")
        console.print(table)
        world = self.procs.world_size
        processes = f" on {world} processes (largest weight difference between them {differ:g})" if world > 1 else ""
        console.print(f"calibration took {seconds:.0f} s{processes}")


class DetachedInputs(nn.Module):
    """A scorer that sees its inputs detached: no gradient reaches the backbone through it."""

    def __init__(self, scorer: nn.Module) -> None:
        super().__init__()
        self.scorer = scorer
        self.attention, self.history = scorer.attention, scorer.history
        self.positions = getattr(scorer, "positions", False)

    def forward(self, tokens: torch.Tensor, *attention: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.scorer(tokens.detach(), *(a.detach() for a in attention), **kwargs)


def _shared_accuracy(model, batches, device: torch.device, procs: Processes, total: int) -> float:
    """Top-1 % of the pruned model over the whole validation set, each process counting its own share."""
    return _top1(model, batches, device, procs, total)


def _top1(model, batches, device: torch.device, procs: Processes, total: int) -> float:
    with torch.no_grad():
        return 100.0 * int(procs.sum(top1_correct(model, reraised(batches), device))) / total


def _check_data(train: Dataset, val: Dataset, batch_size: int, world_size: int) -> None:
    """Refuses, before the model is captured, data that could not fill a single step or be validated on."""
    if len(train) < batch_size * world_size:
        many = f" per process x {world_size} processes" if world_size > 1 else ""
        raise DataError(f"{len(train)} training images are fewer than one batch of {batch_size}{many}: no step could run; "
                        f"lower --batch-size{', start fewer processes' if world_size > 1 else ''}, lower --val-size or add images")
    if len(val) == 0:
        raise DataError("the validation split is empty; raise --val-size")
