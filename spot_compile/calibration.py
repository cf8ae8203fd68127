"""Calibrating SPOT predictors: a short fine-tuning of the predictors against the dense model.

Loss = cross-entropy on labels + `logit_distill` (0.5) * KL(dense teacher || sparse student) on logits
       + `token_distill` * MSE(surviving tokens, the dense model's tokens at the same positions), after the last
         block, each token layer-normalised (DynamicViT's token distillation; scale-free, whatever the stream's norm)
       + 2 * sum over stages of (mean keep probability - stage target)^2.
The student is the calibration graph (`passes.soft_pruning`): the same stages and static keep counts as inference,
with a straight-through top-k mask, masked attention in each stage's block and the kept tokens gathered after it.
By default the backbone stays frozen and only the predictors learn; with `finetune` the backbone learns too (at
`backbone_lr`), against a frozen copy of the dense model as teacher, so that it adapts to seeing fewer tokens. The
tuned backbone then travels in the predictor checkpoint. Accuracy each epoch is measured with the real pruned graph
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

from .api import SparseViT, sparsify
from .capture import capture, clone_graph_module, example_input
from .checkpoints import fingerprint, load_tensors
from .config import SparsifyConfig
from .data import ImageSet
from .errors import CheckpointError, DataError, UsageError, first_line
from .outputs import check_writable_file, save_atomically
from .passes.find_blocks import find_blocks
from .passes.soft_pruning import build_calibration_graph, kept_positions, tap_final_tokens
from .policies import default_stages
from .predictors import PredictorCheckpoint, PredictorConfig, make_predictors, save_predictors
from .preprocessing import Normalization, model_normalization
from .runlog import RunLog
from .training import accuracy, augment, batches, cosine_lr, logits_of

PARTIAL_FORMAT = "spot-compile/calibration-partial/1"


@dataclass
class CalibrationResult:
    checkpoint: PredictorCheckpoint
    sparse: SparseViT
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def calibrate(
    model: nn.Module, train: ImageSet, val: ImageSet, budget: float, *, stages: tuple[int, ...] | None = None,
    epochs: int = 2, batch_size: int = 128, lr: float = 3e-3, predictor: PredictorConfig = PredictorConfig(),
    max_steps: int | None = None, seed: int = 0, out: Path | None = None, console: Console | None = None,
    input_size: int | None = None, compile: bool = True, noise: float = 0.3, finetune: bool = False,
    backbone_lr: float = 1e-4, token_distill: float = 0.0, logit_distill: float = 0.5, save_every: int | None = None,
    normalization: Normalization | None = None,
) -> CalibrationResult:
    """Trains one SPOT predictor per stage for `model` at `budget`; see the module docstring for the loss.

    `compile` runs the calibration graph and the teacher under torch.compile: measured on 2 CPU cores on the earlier
    graph that masked every later block, a step of the shipped model at batch 128 dropped from ~15 s to ~3 s
    (Inductor fuses the masked softmax and the descriptor reductions, which dominate in eager), for a one-time
    compile of ~2 minutes.
    With `finetune`, `model`'s own parameters are updated in place.

    With `out`, a partial checkpoint `<out>.partial` is written (atomically) after every epoch and, with `save_every`,
    every that many steps; a run started again with the same arguments resumes from it exactly (predictors, optimizer,
    schedule, the epoch's shuffle, every random generator), also when it was killed mid-epoch.

    Images are normalised by `normalization`, by default as the model declares (`preprocessing.model_normalization`;
    a model that declares nothing is refused before the capture), and the choice is printed.
    """
    console = console or Console()
    _check_arguments(train, val, batch_size, epochs, max_steps, save_every)
    if out is not None:
        out = check_writable_file(out, "--out")
    normalization = normalization or model_normalization(model)
    normalization.check_channels(int(train.images.shape[1]))
    console.print(normalization.describe())
    torch.manual_seed(seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    example = example_input(model, input_size)
    with torch.no_grad():  # a model without tensor logits is refused now, not after the compile (minutes)
        classes = logits_of(model(example)).shape[-1]
    if len(train.classes) != classes:
        raise DataError(f"the data has {len(train.classes)} classes but the model's head gives {classes} logits; "
                        "calibrate on data with the classes the model was trained on, in its order")
    captured = capture(model, example)
    # The teacher must stay the dense model the user brought, also while the backbone under it is being tuned.
    distill = bool(logit_distill or token_distill)  # without distillation no teacher runs: a step is that much cheaper
    teacher_graph = (capture(copy.deepcopy(model), example) if finetune else clone_graph_module(captured)) if distill else None
    teacher_tokens = tap_final_tokens(teacher_graph) if distill else None
    structure = find_blocks(captured)
    stages = stages or default_stages(len(structure.blocks))
    predictors = make_predictors(structure, stages, predictor)
    sparse = sparsify(model, SparsifyConfig(budget=budget, stages=stages, policy="spot", input_size=input_size), scorers=predictors)
    keep = tuple(s.keep for s in sparse.plan.stages)
    student, keepers = build_calibration_graph(captured, stages, keep, predictors, noise)
    run_student = torch.compile(student) if compile else student
    run_teacher = torch.compile(teacher_graph) if compile and distill else teacher_graph
    targets, alive = [], structure.tokens - structure.num_special
    for k in keep:
        targets.append(k / alive)
        alive = k
    groups = [{"params": [p for m in predictors.values() for p in m.parameters()], "base_lr": lr}]
    if finetune:
        backbone = list(model.parameters())
        for p in backbone:
            p.requires_grad_(True)
        groups.append({"params": backbone, "base_lr": backbone_lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train) // batch_size  # full batches only: a ragged last batch would recompile
    total = min(max_steps or steps_per_epoch * epochs, steps_per_epoch * epochs)
    partial = out.with_suffix(".partial") if out else None
    history, start_epoch, step = [], 0, 0
    # What a partial checkpoint must have been made for to be resumed here: the same model, budget, stages and setup.
    # In its JSON form (tuples as lists), as it is read back from a partial.
    identity = json.loads(json.dumps({"fingerprint": fingerprint(model, structure), "budget": budget, "stages": list(stages),
                                      "keep": list(keep), "predictor": asdict(predictor), "finetune": finetune,
                                      "batch_size": batch_size}))
    resume = None
    if partial and partial.exists():
        state = _read_partial(partial, identity)
        try:
            for s, m in predictors.items():
                m.load_state_dict(state["predictors"][s])
            if finetune:
                model.load_state_dict(state["backbone"])
            opt.load_state_dict(state["opt"])
            history, start_epoch, step = json.loads(state["history"]), int(state["epoch"]), int(state["step"])
            resume = {"batch": int(state["batch"]), "epoch_gen": state["epoch_gen"], "gen": state["gen"],
                      "torch_rng": state["torch_rng"], "sums": json.loads(state["sums"]), "n": int(state["n"])}
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{partial} is a damaged partial calibration ({first_line(e)}); delete it to start afresh") from None
        console.print(f"resuming calibration at step {step} (epoch {start_epoch + 1}, batch {resume['batch']})")

    def save_partial(epoch: int, batch: int, epoch_gen: torch.Tensor, sums: dict, n: int) -> None:
        """Everything a resumed run needs to continue as if never stopped; `epoch_gen` is the generator's state when
        `epoch` began (its shuffle is drawn from it again), `batch` the batches of that epoch already trained."""
        save_atomically({"format": PARTIAL_FORMAT, "identity": json.dumps(identity, sort_keys=True),
                         "predictors": {s: m.state_dict() for s, m in predictors.items()}, "opt": opt.state_dict(),
                         "backbone": model.state_dict() if finetune else None, "history": json.dumps(history),
                         "epoch": epoch, "batch": batch, "step": step, "epoch_gen": epoch_gen, "gen": gen.get_state(),
                         "torch_rng": torch.get_rng_state(), "sums": json.dumps(sums), "n": n}, partial, "--out")

    t0 = time.time()
    log = RunLog(console, out.with_suffix(".jsonl") if out else None, total, batch_size, resumed=resume is not None)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("calibrating", total=total, completed=step, rate="")
        for epoch in range(start_epoch, epochs):
            if step >= total:
                break
            student.train()
            for m in predictors.values():
                m.train()
            sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "tok": 0.0, "ratio": 0.0}
            n, first = 0, 0
            if resume is not None and epoch == start_epoch:  # the same shuffle, then the generators as they were
                gen.set_state(resume["epoch_gen"])
                epoch_gen, order = resume["epoch_gen"], torch.randperm(len(train), generator=gen)
                if resume["batch"]:  # saved mid-epoch: the generator had gone on past the shuffle
                    gen.set_state(resume["gen"])
                    sums, n, first = resume["sums"], resume["n"], resume["batch"]
                torch.set_rng_state(resume["torch_rng"])
            else:
                epoch_gen, order = gen.get_state(), torch.randperm(len(train), generator=gen)
            epoch_batches = batches(train, batch_size, shuffle=True, normalization=normalization, order=order[first * batch_size:])
            for i, (x, y) in enumerate(epoch_batches, first):
                if step >= total or len(y) < batch_size:
                    break
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, total, warmup=max(1, total // 20), base=g["base_lr"])
                x = augment(x, gen)
                with torch.no_grad():
                    teacher = logits_of(run_teacher(x)) if distill else None
                logits = logits_of(run_student(x))
                ce = F.cross_entropy(logits, y)
                kl = (F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
                      if logit_distill else torch.zeros(()))
                ratio = sum((keepers[s].soft_ratio.mean() - t) ** 2 for s, t in zip(stages, targets))
                tok = token_loss(student.spot_final_tokens.value, teacher_tokens.value,
                                 [keepers[s] for s in stages], structure.num_special) if token_distill else torch.zeros(())
                loss = ce + logit_distill * kl + token_distill * tok + 2.0 * ratio
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                parts = {key: float(v.detach()) for key, v in (("loss", loss), ("ce", ce), ("kl", kl), ("tok", tok), ("ratio", ratio))}
                for key, v in parts.items():
                    sums[key] += v
                n += 1
                step += 1
                progress.update(task, advance=1, description=f"epoch {epoch + 1} loss {sums['loss'] / n:.3f}",
                                rate=f"{log.images_per_s():.1f} img/s")
                # the keep-ratio loss is "ratio_loss" in the log, apart from the keep ratios themselves
                log.step(step, epoch + 1, {**{k: v for k, v in parts.items() if k != "ratio"}, "ratio_loss": parts["ratio"],
                                           "lr": [g["lr"] for g in opt.param_groups],
                                           "keep_ratio": {str(s): float(keepers[s].soft_ratio.mean()) for s in stages}})
                if partial and save_every and step % save_every == 0 and step < total:
                    save_partial(epoch, i + 1, epoch_gen, sums, n)
            for m in predictors.values():
                m.eval()
            row = {"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in sums.items()},
                   "val_top1": accuracy(sparse, val, normalization=normalization)}
            history.append(row)
            log.validation(row)
            progress.console.print(f"epoch {row['epoch']}: loss {row['loss']:.3f}  val top-1 (pruned) {row['val_top1']:.2f}%")
            if partial:
                save_partial(epoch + 1, 0, gen.get_state(), {}, 0)
    log.close()
    seconds = time.time() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    tuned = "backbone tuned" if finetune else "backbone frozen"
    table = Table(title=f"calibration: budget {budget}, stages {list(stages)}, keep {list(keep)}, {tuned}")
    for col in ("epoch", "loss", "CE", "KL", "tokens", "keep-ratio", "val top-1 % (pruned)"):
        table.add_column(col)
    for r in history:
        table.add_row(str(r["epoch"]), f"{r['loss']:.4f}", f"{r['ce']:.4f}", f"{r['kl']:.4f}", f"{r.get('tok', 0.0):.4f}",
                      f"{r['ratio']:.5f}", f"{r['val_top1']:.2f}")
    console.print(table)
    console.print(f"calibration took {seconds:.0f} s")
    ckpt = PredictorCheckpoint(predictors, tuple(stages), budget, predictor,
                               {"history": history, "seconds": seconds, "keep": list(keep), "finetune": finetune,
                                "token_distill": token_distill, "logit_distill": logit_distill},
                               backbone={k: v.detach().clone() for k, v in model.state_dict().items()} if finetune else None)
    if out:
        save_predictors(out, ckpt, model, structure)
        if partial:
            partial.unlink(missing_ok=True)
    return CalibrationResult(ckpt, sparse, history, seconds)


def _check_arguments(train: ImageSet, val: ImageSet, batch_size: int, epochs: int, max_steps: int | None,
                     save_every: int | None) -> None:
    """Refuses, before the model is captured, a run that could not train a single step or validate."""
    for name, value, least in (("batch size", batch_size, 1), ("epochs", epochs, 1)):
        if not isinstance(value, int) or value < least:
            raise UsageError(f"{name} must be a whole number >= {least}, got {value!r}")
    for name, value in (("max_steps", max_steps), ("save_every", save_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UsageError(f"{name} must be a whole number >= 1 (or None), got {value!r}")
    if len(train) < batch_size:
        raise DataError(f"{len(train)} training images are fewer than one batch of {batch_size}: no step could run; "
                        "lower --batch-size, lower --val-size or add images")
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
