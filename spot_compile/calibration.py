"""Calibrating SPOT predictors: a short fine-tuning of the predictors against the dense model.

Loss = cross-entropy on labels + `logit_distill` (0.5) * KL(dense teacher || sparse student) on logits
       + `token_distill` * MSE(surviving tokens, the dense model's tokens at the same positions), after the last
         block, each token layer-normalised (DynamicViT's token distillation; scale-free, whatever the stream's norm)
       + `keep_ratio_weight` (2) * sum over stages of (mean keep probability - stage target)^2.
The student is the calibration graph (`passes.soft_pruning`): the same stages and static keep counts as inference,
with a straight-through top-k mask, masked attention in each stage's block and the kept tokens gathered after it.
By default the backbone stays frozen and only the predictors learn. With `finetune` the backbone learns too (at
`backbone_lr`), against a frozen copy of the dense model as teacher, so that it adapts to seeing fewer tokens; the
tuned backbone then travels in the predictor checkpoint. `finetune_graph` says through which graph: "deployed" (the
default) calibrates the predictors on the frozen backbone first, then tunes the backbone for as many steps again
through the sparse graph that will run, with those predictors fixed (loss: cross-entropy + the logit KL); "calibration"
tunes it in the same steps as the predictors, through the calibration graph. docs/spot.md measured "deployed" ahead on
the cluttered benchmark (66.13 / 66.35 % against 65.52 / 65.00 % at budget 0.4, two seeds). Accuracy each epoch is measured with the real pruned graph
on a validation split of the training set.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from .api import SparseViT, sparsify
from .capture import capture, clone_graph_module, example_input
from .checkpoints import fingerprint, load_tensors
from .config import SparsifyConfig, flops_fraction
from .data import ImageSet
from .distributed import Processes, default_workers, local_rank, resolve_device
from .errors import CheckpointError, DataError, UsageError, first_line
from .outputs import check_writable_file, save_atomically
from .passes.find_blocks import find_blocks
from .passes.soft_pruning import MASK_GRADIENTS, build_calibration_graph, kept_positions, tap_final_tokens
from .policies import default_stages
from .predictors import PredictorCheckpoint, PredictorConfig, make_predictors, save_predictors
from .preprocessing import Preprocessing, model_preprocessing
from .runlog import RunLog
from .streaming import EvalTransform, Prepared, SeededSampler, TrainTransform, as_dataset, classes_of, loader, reraised
from .training import cosine_lr, logits_of

PARTIAL_FORMAT = "spot-compile/calibration-partial/3"
# Through which graph `finetune` tunes the backbone; the first is the default.
FINETUNE_GRAPHS = ("deployed", "calibration")


@dataclass
class CalibrationResult:
    checkpoint: PredictorCheckpoint
    sparse: SparseViT
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def calibrate(
    model: nn.Module, train: Dataset | ImageSet, val: Dataset | ImageSet, budget: float, *, stages: tuple[int, ...] | None = None,
    epochs: int = 2, batch_size: int = 128, lr: float = 3e-3, predictor: PredictorConfig = PredictorConfig(),
    max_steps: int | None = None, seed: int = 0, out: Path | None = None, console: Console | None = None,
    input_size: int | None = None, compile: bool = True, noise: float = 0.3, finetune: bool = False,
    backbone_lr: float = 1e-4, token_distill: float = 0.0, logit_distill: float = 0.5, save_every: int | None = None,
    preprocessing: Preprocessing | None = None, workers: int | None = None, device: str | torch.device | None = "cpu",
    precision: str = "fp32", backbone_from_scores: bool = True, mask_gradient: str = MASK_GRADIENTS[0],
    val_every: int | None = None, finetune_graph: str | None = None, keep_ratio_weight: float = 2.0,
    rank_budget: float | None = None,
) -> CalibrationResult:
    """Trains one SPOT predictor per stage for `model` at `budget`; see the module docstring for the loss.

    `train` and `val` are Datasets of (image, label) pairs, images as PIL images or [0, 1] tensors (`streaming`
    reads IDX directories and ImageFolder trees so), or in-memory `ImageSet`s. They go through the model's own
    preprocessing (`preprocessing.model_preprocessing`: normalisation, resize and crop, and the declared training
    augmentation, printed at the start), with `workers` loader processes (default: `distributed.default_workers`).

    Under torchrun (`torchrun --nproc-per-node N -m spot_compile calibrate ...`, or a process group the caller
    joined), the student trains under DistributedDataParallel: `batch_size` is per process, the global batch is
    N x `batch_size`, the learning rates are used as given. Rank 0 alone prints and writes; validation is shared out.
    `device` ("cpu", "cuda", None: the GPU when there is one) holds model, teacher and data; `precision` "bf16"
    runs the forward passes under autocast. With `finetune`, `model`'s own parameters are updated in place (and
    the model is moved to `device`). `finetune_graph` "deployed" (the default, None) runs twice the steps: the predictors'
    calibration on the frozen backbone, then the backbone's fine-tune through the deployed graph (the module docstring).

    `compile` runs the calibration graph and the teacher under torch.compile: measured on 2 CPU cores on the earlier
    graph that masked every later block, a step of the shipped model at batch 128 dropped from ~15 s to ~3 s
    (Inductor fuses the masked softmax and the descriptor reductions, which dominate in eager), for a one-time
    compile of ~2 minutes.

    With `out`, a partial checkpoint `<out>.partial` is written (atomically) after every epoch and, with `save_every`,
    every that many steps; a run started again with the same arguments resumes from it exactly (predictors, optimizer,
    schedule, the epoch's shuffle and position, every process's random generators), also when it was killed mid-epoch.

    `backbone_from_scores` False (with `finetune_graph` "calibration"): the predictors read the backbone's tokens and attention detached,
    so the backbone learns only from the loss through the tokens it keeps, not from what would move the scores.

    `mask_gradient` is where a score's gradient comes from (`passes.soft_pruning`): "block" (default), the stage's
    block alone; "downstream", the stage's block and, for the kept tokens, every later block; "full", DynamicViT's
    masking: dropped tokens stay in the stream as keys weighted by their mask in every later block (a step costs more).

    `val_every`: validate every that many steps too (besides after each epoch) and return the predictors, and the
    tuned backbone, of the best validation top-1 rather than the last: the straight-through objective can drift away
    from accuracy as it trains (docs/spot.md measured 64.80 % after 150 steps and 58.50 % after 429 at budget 0.4).

    `rank_budget` (default: `budget`): the budget whose static keep counts the calibration graph trains the predictors
    at (with `finetune_graph` "calibration", the backbone too). Validation, the deployed graph and its backbone tune stay
    at `budget`, and the checkpoint deploys at any budget, since a predictor only ranks. Why: at high keep ratios the
    top-k boundary lies in the background and the calibration learns to rank the object below it; on the cluttered
    benchmark (docs/spot.md) predictors calibrated at 0.6 select at 51.28 % at 0.6 (429 steps), those calibrated at
    0.4 at 65.32 %. On Fashion-MNIST, where the garment fills half the image, 0.6 beats 0.4 at both budgets, hence the
    default.
    """
    device = resolve_device(device, local_rank())
    workers = default_workers(device) if workers is None else workers
    procs = Processes.from_env(device)
    console = console or Console()
    if not procs.main:
        console = Console(quiet=True)
    train, val = as_dataset(train), as_dataset(val)
    _check_arguments(train, val, batch_size, epochs, max_steps, save_every, val_every, procs.world_size)
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose {' or '.join(PRECISIONS)}")
    if mask_gradient not in MASK_GRADIENTS:
        raise UsageError(f"unknown mask gradient {mask_gradient!r}; choose {' or '.join(MASK_GRADIENTS)}")
    if finetune_graph is not None and not finetune:
        raise UsageError(f"a fine-tune graph ({finetune_graph!r}) is only used with finetune=True (--finetune); "
                         "add it, or leave the graph out")
    finetune_graph = FINETUNE_GRAPHS[0] if finetune_graph is None else finetune_graph
    if finetune_graph not in FINETUNE_GRAPHS:
        raise UsageError(f"unknown fine-tune graph {finetune_graph!r}; choose {' or '.join(FINETUNE_GRAPHS)}")
    budget = flops_fraction(budget, "budget")  # before the capture and compile, not after
    rank_budget = budget if rank_budget is None else flops_fraction(rank_budget, "rank_budget")
    if not isinstance(keep_ratio_weight, (int, float)) or keep_ratio_weight < 0:
        raise UsageError(f"keep_ratio_weight must be a number >= 0, got {keep_ratio_weight!r}")
    joint = finetune and finetune_graph == "calibration"  # the backbone learns with the predictors
    after = finetune and not joint  # ... or after them, through the deployed graph
    if not backbone_from_scores and not joint:
        raise UsageError("backbone_from_scores=False only changes a backbone tuned with the predictors: use it with "
                         "finetune=True, finetune_graph='calibration'")
    phases = ("calibrate", "tune") if after else ("calibrate",)
    if out is not None:
        out = check_writable_file(out, "--out")
    torch.manual_seed(seed)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    example = example_input(model, input_size)
    if preprocessing is None:
        preprocessing = model_preprocessing(model, int(example.shape[1]), tuple(example.shape[-2:]))
    train_set, val_set = Prepared(train, TrainTransform(preprocessing)), Prepared(val, EvalTransform(preprocessing))
    with torch.no_grad():  # bad data and a model without tensor logits are refused now, not after the compile (minutes)
        _ = train_set[0], val_set[0]
        classes = logits_of(model(example)).shape[-1]
    named = classes_of(train)
    if named is not None and len(named) != classes:
        raise DataError(f"the data has {len(named)} classes but the model's head gives {classes} logits; "
                        "calibrate on data with the classes the model was trained on, in its order")
    captured = capture(model, example)
    # The teacher must stay the dense model the user brought, also while the backbone under it is being tuned.
    distill = bool(logit_distill or token_distill)  # without distillation no teacher runs: a step is that much cheaper
    teacher_graph = (capture(copy.deepcopy(model), example) if finetune else clone_graph_module(captured)) if distill else None
    teacher_tokens = tap_final_tokens(teacher_graph) if distill else None
    structure = find_blocks(captured)
    stages = stages or default_stages(len(structure.blocks))
    predictors = make_predictors(structure, stages, predictor)
    for m in predictors.values():
        m.to(device)
    sparse = sparsify(model, SparsifyConfig(budget=budget, stages=stages, policy="spot", input_size=input_size), scorers=predictors)
    ranking = sparse
    if rank_budget != budget:
        ranking = sparsify(model, SparsifyConfig(budget=rank_budget, stages=stages, policy="spot", input_size=input_size),
                           scorers=predictors)
    keep = tuple(s.keep for s in ranking.plan.stages)  # the calibration graph's; `sparse`'s where rank_budget is budget
    scorers = predictors if backbone_from_scores else {s: DetachedInputs(m) for s, m in predictors.items()}
    student, keepers = build_calibration_graph(captured, stages, keep, scorers, noise, mask_gradient)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    targets, alive = [], structure.tokens - structure.num_special
    for k in keep:
        targets.append(k / alive)
        alive = k
    groups = [{"params": [p for m in predictors.values() for p in m.parameters()], "base_lr": lr}]
    backbone = list(model.parameters())
    if joint:
        for p in backbone:
            p.requires_grad_(True)
        groups.append({"params": backbone, "base_lr": backbone_lr})
    trained = student
    if procs.world_size > 1:  # after requires_grad is set: DDP synchronises only what requires grad when it is built
        trained = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    run_student = torch.compile(trained) if compile else trained
    run_teacher = torch.compile(teacher_graph) if compile and distill else teacher_graph
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    sampler = SeededSampler(train, procs.world_size, procs.rank, seed)
    train_loader = loader(train_set, batch_size, sampler=sampler, workers=workers, pin_memory=device.type == "cuda", drop_last=True)
    mine = list(range(procs.rank, len(val), procs.world_size))  # each process validates every world-th image
    val_loader = loader(Subset(val_set, mine), max(batch_size, 256), workers=workers, pin_memory=device.type == "cuda")
    steps_per_epoch = sampler.num_samples // batch_size  # full batches only: a ragged last batch would recompile
    total = min(max_steps or steps_per_epoch * epochs, steps_per_epoch * epochs)  # steps per phase
    partial = out.with_suffix(".partial") if out else None
    history, start_epoch, step = [], 0, 0
    # With val_every: the best validation so far, and a copy of what made it (restored at the end if not the last).
    best: dict = {"top1": -1.0, "step": 0, "predictors": None, "backbone": None, "checks": []}
    # What a partial checkpoint must have been made for to be resumed here: the same model, budget, stages and setup.
    # In its JSON form (tuples as lists), as it is read back from a partial.
    identity = {"fingerprint": fingerprint(model, structure), "budget": budget, "stages": list(stages),
                "keep": list(keep), "predictor": asdict(predictor), "finetune": finetune,
                "finetune_graph": finetune_graph if finetune else None,
                "mask_gradient": mask_gradient, "val_every": val_every, "keep_ratio_weight": keep_ratio_weight,
                "batch_size": batch_size, "world_size": procs.world_size}
    if rank_budget != budget:  # only then: a partial written before rank_budget existed stays resumable
        identity["rank_budget"] = rank_budget
    identity = json.loads(json.dumps(identity))
    # The backbone's fine-tune through the deployed graph (finetune_graph "deployed"): built when its phase starts.
    tuner: dict = {}

    def start_tuning(fresh: bool) -> None:
        """Freezes the predictors and makes the backbone trainable through `sparse` (the deployed graph, which shares
        the model's parameters): its optimizer, and the graph that trains, under DDP and compile as the student.
        `fresh`: the phase starts now, from the predictors of the best validation when `val_every` kept one."""
        if fresh and val_every and best["predictors"] is not None:
            for s, m in predictors.items():
                m.load_state_dict(best["predictors"][s])
        for m in predictors.values():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        for p in backbone:
            p.requires_grad_(True)
        graph = sparse.graph_module
        if procs.world_size > 1:
            graph = DistributedDataParallel(graph, device_ids=[device.index] if device.type == "cuda" else None)
        tuner["opt"] = torch.optim.AdamW([{"params": backbone, "base_lr": backbone_lr}], lr=backbone_lr, weight_decay=0.01)
        tuner["run"] = torch.compile(graph) if compile else graph

    resume = None
    if partial and partial.exists():
        state = _read_partial(partial, identity)
        try:
            for s, m in predictors.items():
                m.load_state_dict(state["predictors"][s])
            if finetune:
                model.load_state_dict(state["backbone"])
            if int(state["opt_phase"]) == 1:
                start_tuning(fresh=False)
                tuner["opt"].load_state_dict(state["opt"])
            else:
                opt.load_state_dict(state["opt"])
            history, start_epoch, step = json.loads(state["history"]), int(state["epoch"]), int(state["step"])
            if state.get("best") is not None:
                best = {**state["best"], "top1": float(state["best"]["top1"]), "step": int(state["best"]["step"]),
                        "checks": json.loads(state["best"]["checks"])}
            resume = {"batch": int(state["batch"]), "rng": state["rng"][procs.rank], "sums": json.loads(state["sums"]),
                      "n": int(state["n"])}
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{partial} is a damaged partial calibration ({first_line(e)}); delete it to start afresh") from None
        console.print(f"resuming calibration at step {step} (epoch {start_epoch + 1}, batch {resume['batch']})")

    def save_partial(epoch: int, batch: int, sums: dict, n: int) -> None:
        """Everything a resumed run needs to continue as if never stopped: `batch` is how many batches of `epoch`
        were trained (its shuffle is drawn again from the seed and the epoch), and each process's generators."""
        rng = procs.gather(_rng_state(device))  # a collective: every process takes part, rank 0 writes
        if procs.main:
            save_atomically({"format": PARTIAL_FORMAT, "identity": json.dumps(identity, sort_keys=True),
                             "predictors": {s: m.state_dict() for s, m in predictors.items()},
                             "opt": (tuner["opt"] if tuner else opt).state_dict(), "opt_phase": 1 if tuner else 0,
                             "backbone": model.state_dict() if finetune else None, "history": json.dumps(history),
                             "epoch": epoch, "batch": batch, "step": step, "rng": rng, "sums": json.dumps(sums), "n": n,
                             "best": {**best, "checks": json.dumps(best["checks"])}},
                            partial, "--out")

    def validate() -> float:
        """Top-1 % of the pruned model on `val`, shared out over the processes (every process must call it)."""
        sparse.eval()
        for m in predictors.values():
            m.eval()
        with autocast:
            top1 = _shared_accuracy(sparse, val_loader, device, procs, len(val))
        train_mode()
        return top1

    def keep_if_best(top1: float) -> None:
        best["checks"].append({"step": step, "val_top1": top1})
        if val_every and top1 > best["top1"]:
            best.update(top1=top1, step=step, predictors={s: copy.deepcopy(m.state_dict()) for s, m in predictors.items()},
                        backbone=copy.deepcopy(model.state_dict()) if finetune else None)

    def train_mode() -> None:
        """The graph that learns in train mode; the predictors too while they learn (exploration noise)."""
        (sparse if tuner else student).train()
        for m in predictors.values():
            m.train(not tuner)

    console.print(preprocessing.describe())  # once every setting and file is accepted, before the first step
    t0 = time.time()
    log = RunLog(console, out.with_suffix(".jsonl") if out and procs.main else None, total * len(phases), batch_size * procs.world_size,
                 resumed=resume is not None)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=not procs.main) as progress:
        task = progress.add_task("calibrating", total=total * len(phases), completed=step, rate="")
        # Phase p ("calibrate", then "tune") owns epochs [p * epochs, (p + 1) * epochs) and steps [p * total, (p + 1) * total).
        for epoch in range(start_epoch, epochs * len(phases)):
            phase = epoch // epochs
            end = total * (phase + 1)
            if step >= end:
                continue  # max_steps ended this phase before its last epoch
            if phase == 1 and not tuner:
                start_tuning(fresh=True)
            train_mode()
            name = f"tune {epoch - epochs + 1}" if phase else f"epoch {epoch + 1}"
            sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "tok": 0.0, "ratio": 0.0}
            n, first = 0, 0
            if resume is not None and epoch == start_epoch:
                sums, n, first = (resume["sums"], resume["n"], resume["batch"]) if resume["batch"] else (sums, 0, 0)
                _set_rng_state(resume["rng"], device)
            sampler.start(epoch, first * batch_size)
            for i, (x, y) in enumerate(reraised(train_loader), first):
                if step >= end:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if named is None and int(y.max()) >= classes:
                    raise DataError(f"label {int(y.max())} in the data, but the model's head gives {classes} logits; "
                                    "calibrate on data with the classes the model was trained on")
                optimizer = tuner["opt"] if tuner else opt
                for g in optimizer.param_groups:
                    g["lr"] = cosine_lr(step - phase * total, total, warmup=max(1, total // 20), base=g["base_lr"])
                with torch.no_grad(), autocast:
                    teacher = logits_of(run_teacher(x)).float() if distill else None
                with autocast:
                    logits = logits_of((tuner["run"] if tuner else run_student)(x)).float()
                ce = F.cross_entropy(logits, y)
                zero = torch.zeros((), device=device)
                kl = (F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
                      if logit_distill else zero)
                # The deployed graph keeps exactly its static counts and taps no tokens: no keep-ratio or token loss.
                ratio = zero if tuner else sum((keepers[s].soft_ratio.mean() - t) ** 2 for s, t in zip(stages, targets))
                tok = (token_loss(student.spot_final_tokens.value.float(), teacher_tokens.value.float(),
                                  [keepers[s] for s in stages], structure.num_special) if token_distill and not tuner else zero)
                loss = ce + logit_distill * kl + token_distill * tok + keep_ratio_weight * ratio
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # one all-reduce of five numbers: the log shows the global batch's losses, not rank 0's share
                values = procs.mean(torch.stack([loss, ce, kl, tok, ratio]).detach().float()).tolist()
                parts = dict(zip(("loss", "ce", "kl", "tok", "ratio"), values))
                for key, v in parts.items():
                    sums[key] += v
                n += 1
                step += 1
                progress.update(task, advance=1, description=f"{name} loss {sums['loss'] / n:.3f}",
                                rate=f"{log.images_per_s():.1f} img/s")
                # the keep-ratio loss is "ratio_loss" in the log, apart from the keep ratios themselves
                log.step(step, epoch + 1, {**{k: v for k, v in parts.items() if k != "ratio"}, "ratio_loss": parts["ratio"],
                                           "lr": [g["lr"] for g in optimizer.param_groups], "phase": phases[phase],
                                           **({} if tuner else {"keep_ratio": {str(s): float(keepers[s].soft_ratio.detach().mean())
                                                                               for s in stages}})})
                # the epoch's last step is validated below, after the loop
                if val_every and step % val_every == 0 and step < end and i + 1 < steps_per_epoch:
                    top1 = validate()
                    keep_if_best(top1)
                    log.validation({"step": step, "val_top1": top1})
                    progress.console.print(f"step {step}: val top-1 (pruned) {top1:.2f}%")
                if partial and save_every and step % save_every == 0 and step < end:
                    save_partial(epoch, i + 1, sums, n)
            top1 = validate()
            keep_if_best(top1)
            for m in predictors.values():
                m.eval()
            row = {"epoch": epoch + 1, "phase": phases[phase], **{k: v / max(n, 1) for k, v in sums.items()}, "val_top1": top1}
            history.append(row)
            log.validation(row)
            progress.console.print(f"{name}: loss {row['loss']:.3f}  val top-1 (pruned) {row['val_top1']:.2f}%")
            if partial:
                save_partial(epoch + 1, 0, {}, 0)
    log.close()
    seconds = time.time() - t0
    if val_every and best["predictors"] is not None and best["step"] != step:
        for s, m in predictors.items():
            m.load_state_dict(best["predictors"][s])
        if finetune:
            model.load_state_dict(best["backbone"])
        console.print(f"kept the predictors{' and backbone' if finetune else ''} of step {best['step']}: validation "
                      f"top-1 {best['top1']:.2f}% against {best['checks'][-1]['val_top1']:.2f}% after the last step")
    for p in model.parameters():
        p.requires_grad_(False)
    differ = procs.largest_difference([p for m in predictors.values() for p in m.parameters()] +
                                      (list(model.parameters()) if finetune else []))
    tuned = f"backbone tuned ({'jointly' if joint else 'after, through the deployed graph'})" if finetune else "backbone frozen"
    ranked = f"ranked at budget {rank_budget} (keep {list(keep)})" if rank_budget != budget else f"keep {list(keep)}"
    table = Table(title=f"calibration: budget {budget}, stages {list(stages)}, {ranked}, {tuned}")
    for col in ("epoch", "phase", "loss", "CE", "KL", "tokens", "keep-ratio", "val top-1 % (pruned)"):
        table.add_column(col)
    for r in history:
        table.add_row(str(r["epoch"]), r.get("phase", "calibrate"), f"{r['loss']:.4f}", f"{r['ce']:.4f}", f"{r['kl']:.4f}",
                      f"{r.get('tok', 0.0):.4f}", f"{r['ratio']:.5f}", f"{r['val_top1']:.2f}")
    console.print(table)
    processes = f" on {procs.world_size} processes (largest weight difference between them {differ:g})" if procs.world_size > 1 else ""
    console.print(f"calibration took {seconds:.0f} s{processes}")
    ckpt = PredictorCheckpoint(predictors, tuple(stages), budget, predictor,
                               {"history": history, "seconds": seconds, "keep": list(keep), "rank_budget": rank_budget,
                                "finetune": finetune,
                                "finetune_graph": finetune_graph if finetune else None,
                                "token_distill": token_distill, "logit_distill": logit_distill,
                                "world_size": procs.world_size, "global_batch": batch_size * procs.world_size,
                                "rank_weight_difference": differ, "precision": precision,
                                "mask_gradient": mask_gradient, "val_every": val_every, "keep_ratio_weight": keep_ratio_weight,
                                "selected_step": best["step"] if val_every else step, "val_checks": best["checks"]},
                               backbone={k: v.detach().clone() for k, v in model.state_dict().items()} if finetune else None)
    if out and procs.main:
        save_predictors(out, ckpt, model, structure)
        if partial:
            partial.unlink(missing_ok=True)
    procs.barrier()  # no process leaves before the checkpoint is written
    procs.close()
    return CalibrationResult(ckpt, sparse, history, seconds)


PRECISIONS = ("fp32", "bf16")


class DetachedInputs(nn.Module):
    """A scorer that sees its inputs detached: no gradient reaches the backbone through it."""

    def __init__(self, scorer: nn.Module) -> None:
        super().__init__()
        self.scorer = scorer
        self.attention, self.history = scorer.attention, scorer.history
        self.positions = getattr(scorer, "positions", False)

    def forward(self, tokens: torch.Tensor, *attention: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.scorer(tokens.detach(), *(a.detach() for a in attention), **kwargs)


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def _shared_accuracy(model, batches, device: torch.device, procs: Processes, total: int) -> float:
    """Top-1 % over the whole validation set, each process counting its own share."""
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in reraised(batches):
        correct += (logits_of(model(x.to(device))).argmax(-1) == y.to(device)).sum()
    return 100.0 * int(procs.sum(correct)) / total


def _check_arguments(train: Dataset, val: Dataset, batch_size: int, epochs: int, max_steps: int | None,
                     save_every: int | None, val_every: int | None, world_size: int) -> None:
    """Refuses, before the model is captured, a run that could not train a single step or validate."""
    for name, value, least in (("batch size", batch_size, 1), ("epochs", epochs, 1)):
        if not isinstance(value, int) or value < least:
            raise UsageError(f"{name} must be a whole number >= {least}, got {value!r}")
    for name, value in (("max_steps", max_steps), ("save_every", save_every), ("val_every", val_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UsageError(f"{name} must be a whole number >= 1 (or None), got {value!r}")
    if len(train) < batch_size * world_size:
        many = f" per process x {world_size} processes" if world_size > 1 else ""
        raise DataError(f"{len(train)} training images are fewer than one batch of {batch_size}{many}: no step could run; "
                        f"lower --batch-size{', start fewer processes' if world_size > 1 else ''}, lower --val-size or add images")
    if len(val) == 0:
        raise DataError("the validation split is empty; raise --val-size")


def _read_partial(path: Path, identity: dict) -> dict:
    """The partial checkpoint at `path` (tensors only: nothing in it can run code), when it was written by a run of
    this same calibration; a partial of another model, budget, stage list or setup is refused, not resumed."""
    state = load_tensors(path)
    if not isinstance(state, dict) or state.get("format") != PARTIAL_FORMAT:
        raise CheckpointError(f"{path} is not a partial calibration this version wrote; delete it, or choose another --out")
    theirs = json.loads(state.get("identity", "{}"))
    differ = [k for k in identity if theirs.get(k) != identity[k]]
    if differ:
        raise CheckpointError(f"{path} is a partial calibration of another run ({', '.join(differ)} differ); delete it to "
                              "start afresh, or choose another --out")
    return state


def token_loss(student: torch.Tensor, teacher: torch.Tensor, keepers, num_special: int) -> torch.Tensor:
    """MSE between the student's surviving patch tokens and the teacher's tokens at the same image positions,
    both layer-normalised without affine (the residual stream's scale is the model's business, not the loss's)."""
    pos = kept_positions(keepers, teacher.shape[1] - num_special).to(student.device)
    teacher = teacher[:, num_special:]
    dim = teacher.shape[-1]
    target = teacher.gather(1, pos.expand(teacher.shape[0], -1).unsqueeze(-1).expand(-1, -1, dim))
    return F.mse_loss(F.layer_norm(student[:, num_special:], (dim,)), F.layer_norm(target, (dim,)))
