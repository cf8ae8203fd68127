"""Every token policy on equal terms: the same backbone, the same fine-tune, the same stages, the same FLOPs.

    python recipes/cluttered_fmnist.py                                  # the cluttered data, once (~1 min)
    python -m research.fair_policies --dataset cluttered              # -> docs/results/fair_policies/fair_cluttered.{json,md,png}
    python -m research.fair_policies --dataset fmnist                 # the shipped model's table, made fair

Each arm starts from the same dense backbone and gets the same fine-tune: `--steps` steps of `--batch` images of the
training split (5k held out for validation; the test split is never seen), AdamW at `--backbone-lr` with warm-up and
cosine decay, cross-entropy + 0.5 KL to the frozen dense model, the model's own augmentation, at `--tune-budget`.
The training-free policies (random, class attention with and without fusing, merging) are tuned through the very
sparse graph `sparsify` makes for them (it shares the model's parameters, and its token ops are plain torch, so the
gradient flows through the kept tokens); the SPOT arms through the calibration graph (`calibrate(finetune=True)`,
straight-through top-k), which trains their predictors in the same steps. "coverage" is the SPOT arm with a prior
weight (1e4) that outweighs every logit: a fixed farthest-point thinning, tuned the same way. The control is the
same fine-tune without pruning. Every drop policy reduces in front of the same blocks (`--stages`); merging runs as
ToMe ships, in front of every block, and is tuned at the lowest budget of `--budgets` it can reach when the tune budget
is below what it can reach (bipartite merging removes at most half the tokens a block). A budget a policy cannot reach
is reported as such.

Variants of SPOT's calibration, for finding out why it does or does not win (docs/research/): "spot noise 0" (no
exploration noise), "spot detached" (the backbone learns nothing through the predictors' inputs), "spot then tune"
(the predictors calibrated `--steps` steps on the frozen backbone, then the backbone tuned `--steps` steps exactly
as the training-free arms are, through the deployed sparse graph with those predictors fixed: the same backbone
fine-tune as theirs, plus the calibration), "spot then tune (predictors at 0.4)" (the same, with the predictors
calibrated at budget 0.4 whatever `--tune-budget`), "spot then tune (block gradient)" (the same, with a score's
gradient from its stage's block alone, as every SPOT arm had before the downstream gradient:
`calibrate(mask_gradient="block")`), "spot then tune (predictors at 0.4; block gradient)" (both) and "spot then tune
-<signal>" (its signal ablations). "spot --finetune" is the library's own `calibrate(finetune=True)` (finetune graph
"deployed", block gradient): "spot then tune (block gradient)" as the library does it, the fine-tune's shuffle drawn
from later epochs of the same seed; "spot --finetune --rank-budget 0.4" is "spot then tune (predictors at 0.4; block
gradient)" as the library does it (`calibrate(rank_budget=0.4)`), and "spot --finetune + coverage" the library's
path with the recipe's coverage prior. `--seed` changes every fine-tune's shuffle, augmentation and noise, for the
run-to-run spread.

Each tuned backbone is then evaluated at every budget of `--budgets` on the held-out test split: top-1 at the FLOPs
ratio reached (FlopCounterMode), and, where the data has object boxes (the cluttered set), the kept-token box
precision after the last stage against the box's share of the tokens (policies that drop tokens). Tuned arms are
cached in `--run-dir` (a rerun skips them), so a long run can be stopped and continued.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import spot_compile as sc
from benchmarks.arguments import add_results_arguments, comma_choices
from benchmarks.result_table import write_results
from research.boxes import box_precision
from spot_compile.calibration.schedule import cosine_lr
from spot_compile.calibration.trainer import calibrate
from spot_compile.cli.visualize import kept_patches, save_accuracy_vs_flops, save_token_maps
from spot_compile.data.datasets import (
    load_dataset,
    training_datasets,
)
from spot_compile.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from spot_compile.data.loading import Prepared, SeededSampler, loader
from spot_compile.data.preprocessing import model_normalization, model_preprocessing
from spot_compile.data.transforms import TrainTransform
from spot_compile.errors import BudgetError
from spot_compile.graph.capture import capture
from spot_compile.graph.inputs import example_input
from spot_compile.measure.accuracy import accuracy, logits_of
from spot_compile.models.zoo import CLUTTERED_MODEL, SHIPPED_MODEL, load_shipped_model
from spot_compile.policies import policy_class
from spot_compile.scorers.spot import SIGNALS, PredictorConfig
from spot_compile.serialization.checkpoints import load_tensors
from spot_compile.serialization.files import save_atomically
from spot_compile.serialization.predictors import load_predictor_metrics, save_predictors

DATASETS = {  # name -> (model checkpoint, data directory)
    "cluttered": (CLUTTERED_MODEL, Path("runs/cluttered-fmnist")),
    "fmnist": (SHIPPED_MODEL, FASHION_MNIST_DIR),
}
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.8)
# Stages for the 6-block models: the default 1/4, 1/2, 3/4 of the depth (blocks 2, 3, 4) leaves two dense blocks, a third of
# the FLOPs, so 0.3 is out of reach and 0.4 keeps (56, 16, 4) tokens; from block 1 on, class attention keeps
# (82, 34, 14) at 0.3 and (113, 66, 38) at 0.4 (of 196).
STAGES = (1, 2, 4)
COVERAGE_ONLY = 1e4  # prior weight that drowns the predictors' O(1) logits: the selection is the fixed thinning
# The shipped calibration recipe's settings (recipes/calibrate_shipped.py), shared by every arm where they apply.
BATCH, BACKBONE_LR, PREDICTOR_LR, HIDDEN, RECIPE_COVERAGE, LOGIT_DISTILL = 128, 1e-3, 3e-3, 16, 2.0, 0.5


@dataclass(frozen=True)
class Arm:
    policy: str | None  # None: the no-pruning control
    fuse: bool = False
    every_block: bool = False  # merging as ToMe ships it, in front of every block
    coverage: float = 0.0  # SPOT arms: weight of the coverage prior
    signals: tuple[str, ...] = SIGNALS
    noise: float = 0.3  # SPOT arms: Gumbel noise on the scores in training (SoftKeep)
    backbone_from_scores: bool = True  # SPOT arms: the backbone also learns through the predictors' inputs
    then_tune: bool = False  # SPOT arms: calibrate on the frozen backbone, then tune it as the training-free arms are
    predictor_budget: float | None = None  # "then tune" arms: calibrate the predictors at this budget, not --tune-budget
    # SPOT arms: where a score's gradient comes from (calibrate's mask_gradient). Pinned, not the library's default:
    # the arms' cached runs and the figures in docs/spot.md were made with it (the default went back to "block").
    mask_gradient: str = "downstream"
    # SPOT arms that are not "then tune": the graph calibrate(finetune=True) tunes the backbone through. "calibration"
    # (jointly with the predictors) is what the arms' cached runs were made with; "deployed" is the library's default.
    finetune_graph: str = "calibration"
    rank_budget: float | None = None  # arms tuned by calibrate(finetune=True): calibrate(rank_budget=...)

    @property
    def spot(self) -> bool:
        return self.policy == "spot"


ARMS = {
    "no pruning": Arm(None),
    "spot": Arm("spot"),
    "spot + coverage": Arm("spot", coverage=RECIPE_COVERAGE),
    "spot noise 0": Arm("spot", noise=0.0),
    "spot detached": Arm("spot", backbone_from_scores=False),
    "spot then tune": Arm("spot", then_tune=True),
    "spot then tune (predictors at 0.4)": Arm("spot", then_tune=True, predictor_budget=0.4),
    "spot then tune (block gradient)": Arm("spot", then_tune=True, mask_gradient="block"),
    "spot then tune (predictors at 0.4; block gradient)": Arm("spot", then_tune=True, predictor_budget=0.4,
                                                             mask_gradient="block"),
    "spot --finetune": Arm("spot", mask_gradient="block", finetune_graph="deployed"),
    "spot --finetune --rank-budget 0.4": Arm("spot", mask_gradient="block", finetune_graph="deployed", rank_budget=0.4),
    "spot --finetune + coverage": Arm("spot", coverage=RECIPE_COVERAGE, mask_gradient="block", finetune_graph="deployed"),
    "spot --finetune --rank-budget 0.4 + coverage": Arm("spot", coverage=RECIPE_COVERAGE, mask_gradient="block",
                                                         finetune_graph="deployed", rank_budget=0.4),
    "coverage": Arm("spot", coverage=COVERAGE_ONLY),
    "random": Arm("random"),
    "class-attention": Arm("class-attention"),
    "class-attention + fuse": Arm("class-attention", fuse=True),
    "merge": Arm("merge", every_block=True),
    **{f"spot -{s}": Arm("spot", signals=tuple(x for x in SIGNALS if x != s)) for s in SIGNALS},
    **{f"spot then tune -{s}": Arm("spot", signals=tuple(x for x in SIGNALS if x != s), then_tune=True) for s in SIGNALS},
}
assert not any("," in name for name in ARMS), "--arms is a comma-separated list of these names"
# The protocol, SPOT as the library calibrates it; the other SPOT recipes (the joint tune "spot" and
# "spot + coverage", measured worse), the variants and the signal ablations run when named in --arms.
DEFAULT_ARMS = ["no pruning", "spot --finetune", "spot --finetune + coverage", "coverage", "random", "class-attention",
                "class-attention + fuse", "merge"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def load_model(path: Path) -> torch.nn.Module:
    return load_shipped_model(path)[0]  # any checkpoint of the recipe's format: the shipped ones and the tuned arms


def sparse_config(arm: Arm, budget: float, stages: tuple[int, ...], predictors: Path | None) -> sc.SparsifyConfig:
    return sc.SparsifyConfig(budget=budget, policy=arm.policy, fuse_pruned=arm.fuse,
                             stages=None if arm.spot or arm.every_block else stages,
                             predictors=str(predictors) if arm.spot else None)


def tune_through(graph: torch.nn.Module, model: torch.nn.Module, train, steps: int, lr: float, seed: int,
                 compile: bool, console: Console) -> None:
    """The fine-tune every training-free arm gets: `graph` (a sparse or dense graph sharing `model`'s parameters)
    trained for `steps` steps with the calibration recipe's loss, schedule and optimizer, against a frozen copy of
    `model` as it came in."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    run, run_teacher = (torch.compile(graph), torch.compile(teacher)) if compile else (graph, teacher)
    channels, size = model.cfg.in_chans, (model.cfg.img_size, model.cfg.img_size)
    data = Prepared(train, TrainTransform(model_preprocessing(model, channels, size)))
    sampler = SeededSampler(train, 1, 0, seed)
    batches = loader(data, BATCH, sampler=sampler, drop_last=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    torch.manual_seed(seed)
    step, epoch, t0 = 0, 0, time.time()
    graph.train()
    with progress_bar(console) as progress:
        task = progress.add_task("tuning", total=steps)
        while step < steps:
            sampler.start(epoch)
            for x, y in batches:
                if step >= steps:
                    break
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, steps, warmup=max(1, steps // 20), base=lr)
                with torch.no_grad():
                    target = logits_of(run_teacher(x)).float()
                logits = logits_of(run(x)).float()
                kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean")
                loss = F.cross_entropy(logits, y) + LOGIT_DISTILL * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                rate = (time.time() - t0) / step
                progress.update(task, advance=1, description=f"tuning, loss {loss.item():.3f}, {rate:.2f} s/step")
            epoch += 1
    graph.eval()
    for p in params:
        p.requires_grad_(False)


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


def tune_arm(name: str, arm: Arm, base: Path, data: Path, stages, args, console: Console) -> tuple[Path, float]:
    """Fine-tunes one arm (or finds it cached): the path of what it made (a model or a predictor checkpoint), and
    the seconds its fine-tune took, compile included."""
    if args.steps == 0:  # the training-free table: every arm on the untuned backbone
        return base, 0.0
    out = args.run_dir / f"{slug(name)}.pt"
    if out.is_file():
        metrics = load_predictor_metrics(out) if arm.spot else load_tensors(out)["metrics"]
        return out, float(metrics["seconds"])
    console.rule(f"fine-tuning: {name}")
    model = load_model(base)
    train, val = training_datasets(data, 5000, channels=model.cfg.in_chans)
    t0 = time.time()
    if arm.spot:
        epochs = -(-args.steps // (len(train) // BATCH))
        predictor = PredictorConfig(hidden=HIDDEN, signals=arm.signals, coverage=arm.coverage)
        result = calibrate(model, train, val, arm.predictor_budget or args.tune_budget, stages=stages, epochs=epochs, max_steps=args.steps,
                           batch_size=BATCH, lr=PREDICTOR_LR, predictor=predictor, noise=arm.noise,
                           backbone_from_scores=arm.backbone_from_scores, finetune=not arm.then_tune,
                           finetune_graph=None if arm.then_tune else arm.finetune_graph,
                           rank_budget=None if arm.then_tune else arm.rank_budget,
                           mask_gradient=arm.mask_gradient,
                           backbone_lr=args.backbone_lr, logit_distill=LOGIT_DISTILL, out=None if arm.then_tune else out,
                           console=console, compile=args.compile, workers=0, seed=args.seed)
        if not arm.then_tune:
            return out, time.time() - t0
        # The predictors were calibrated on the frozen backbone; now the backbone gets the fine-tune every
        # training-free arm gets, through the deployed sparse graph with those predictors fixed.
        ckpt = result.checkpoint
        sparse = sc.sparsify(model, sc.SparsifyConfig(budget=args.tune_budget, stages=stages,
                                                          policy=sc.GivenScorersConfig(ckpt.predictors)))
        tune_through(sparse.graph_module, model, train, args.steps, args.backbone_lr, args.seed, args.compile, console)
        ckpt.backbone = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ckpt.metrics["seconds"] = time.time() - t0
        save_predictors(out, ckpt, model, sparse.structure)
        return out, ckpt.metrics["seconds"]
    if arm.policy is None:
        graph = capture(model, example_input(model, None))
    else:
        graph = None
        for budget in sorted({args.tune_budget, *[b for b in args.budget_list if b > args.tune_budget]}):
            try:
                graph = sc.sparsify(model, sparse_config(arm, budget, stages, None)).graph_module
                break
            except BudgetError as e:
                console.print(f"{name}: {e}")
        if graph is None:
            raise SystemExit(f"error: {name} reaches none of the budgets")
    shared = {p.data_ptr() for p in graph.parameters()}
    assert all(p.data_ptr() in shared for p in model.parameters()), "the graph must train the model's own parameters"
    tune_through(graph, model, train, args.steps, args.backbone_lr, args.seed, args.compile, console)
    seconds = time.time() - t0
    save_atomically({"config": model.cfg.to_dict(), "state_dict": model.state_dict(),
                     "metrics": {"seconds": seconds, "steps": args.steps, "tune_budget": args.tune_budget}}, out, "--run-dir")
    return out, seconds


def boxes_of(data: Path) -> torch.Tensor | None:
    path = data / "t10k-boxes.npy"
    return torch.from_numpy(np.load(path)) if path.is_file() else None


def measure_selection(sparse, test, probe: torch.Tensor, boxes: torch.Tensor | None, patch: int,
                      kept: list | None = None) -> dict:
    """Top-1 on `test` at the FLOPs ratio `sparse` reached, and, where the data has `boxes`, the last stage's box
    precision on `probe` (its first images; `patch` pixels a side); `kept` is `kept_patches(sparse, probe)` where the
    caller has it already."""
    row = {"flops_ratio": sparse.plan.flops_ratio, "top1": accuracy(sparse, test)}
    if boxes is not None:
        kept = kept_patches(sparse, probe) if kept is None else kept
        bp = box_precision(kept[-1], boxes[: len(probe)], patch)
        row.update(box_precision=bp.precision, box_share=bp.box_share, lift=bp.lift)
    return row


class EvaluationCache:
    """The evaluations of a run directory, one JSON line each, so that a sweep stopped while evaluating resumes at
    the next (arm, budget). A line counts only for the same stages, test subset and probe, and for the checkpoint it
    was measured on as it is now (its size and modification time): a re-tuned arm is measured again."""

    def __init__(self, path: Path, stages: tuple[int, ...], limit: int, precision_images: int):
        self.path, self.setup = path, {"stages": list(stages), "limit": limit, "precision_images": precision_images}
        self.lines = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []

    @staticmethod
    def _stamp(checkpoint: Path) -> list[int]:
        stat = checkpoint.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def get(self, arm: str, budget: float, checkpoint: Path) -> tuple[dict, list[torch.Tensor] | None] | None:
        stamp = self._stamp(checkpoint)
        for line in reversed(self.lines):
            row = line["row"]
            if row["arm"] == arm and row["budget"] == budget and line["setup"] == self.setup and line["checkpoint"] == stamp:
                maps = line["maps"]
                return row, None if maps is None else [torch.tensor(m, dtype=torch.bool) for m in maps]
        return None

    def put(self, row: dict, checkpoint: Path, maps: list[torch.Tensor] | None) -> None:
        line = {"row": row, "setup": self.setup, "checkpoint": self._stamp(checkpoint),
                "maps": None if maps is None else [m.tolist() for m in maps]}
        self.lines.append(line)
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="cluttered")
    ap.add_argument("--model", type=Path, help="dense backbone checkpoint (default: the dataset's shipped one)")
    ap.add_argument("--data", type=Path, help="IDX directory (default: the dataset's)")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, from: {', '.join(ARMS)}")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--stages", default=",".join(map(str, STAGES)), help="blocks the drop policies reduce in front of")
    ap.add_argument("--tune-budget", type=float, default=0.4, help="the budget every arm is fine-tuned at")
    ap.add_argument("--steps", type=int, default=429, help="fine-tune steps per arm (429: one epoch, the shipped recipe; "
                    "0: no fine-tune, the training-free arms on the untuned backbone)")
    ap.add_argument("--backbone-lr", type=float, default=BACKBONE_LR)
    ap.add_argument("--seed", type=int, default=0, help="the fine-tunes' shuffle, augmentation and initialisation "
                    "(the validation split stays the same): run-to-run spread")
    ap.add_argument("--limit", type=int, default=0, help="first N test images only (0: all 10k)")
    ap.add_argument("--precision-images", type=int, default=2000, help="test images the box precision is measured on")
    ap.add_argument("--run-dir", type=Path)
    add_results_arguments(ap, "fair_<dataset>", "fair_policies")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="eager fine-tunes (for a quick check)")
    args = ap.parse_args()
    console = Console()
    base, data = DATASETS[args.dataset]
    base, data = args.model or base, args.data or data
    seeded = f"-seed{args.seed}" if args.seed else ""
    args.run_dir = args.run_dir or Path("runs/fair") / f"{args.dataset}-{args.steps}steps-tuned{args.tune_budget:g}{seeded}"
    args.run_dir.mkdir(parents=True, exist_ok=True)
    names = comma_choices(args.arms, ARMS, "arm(s)")
    budgets = args.budget_list = tuple(float(b) for b in args.budgets.split(","))
    if args.steps == 0 and any(ARMS[n].spot for n in names):
        raise SystemExit("error: the spot arms are calibrated: give --steps > 0, or choose training-free --arms")
    if not base.is_file():
        raise SystemExit(f"error: no dense model at {base}; train it with recipes/train_dense.py (see its docstring)")
    model = load_model(base)
    stages = tuple(int(b) for b in args.stages.split(","))
    test = load_dataset(data, "test", model.cfg.img_size, model.cfg.in_chans)
    boxes = boxes_of(data)
    if args.limit:
        test, boxes = test.subset(torch.arange(args.limit)), None if boxes is None else boxes[: args.limit]
    normalize = model_normalization(model)
    probe = normalize(test.images[: args.precision_images])
    dense_top1 = accuracy(model, test)

    tuned = {name: tune_arm(name, ARMS[name], base, data, stages, args, console) for name in names}
    rows, maps = [], {}
    evals = EvaluationCache(args.run_dir / "evaluations.jsonl", stages, args.limit, args.precision_images)
    with progress_bar(console) as progress:
        task = progress.add_task("evaluating", total=sum(1 if ARMS[n].policy is None else len(budgets) for n in names))
        for name in names:
            arm, (path, seconds) = ARMS[name], tuned[name]
            backbone = None
            for budget in ((1.0,) if arm.policy is None else budgets):
                cached = evals.get(name, budget, path)
                if cached is not None:
                    row, kept_maps = cached
                    rows.append({**row, "tune_seconds": seconds})
                    if kept_maps is not None:
                        maps[name] = kept_maps
                    progress.advance(task)
                    continue
                if backbone is None:
                    backbone = model if arm.spot else load_model(path)
                torch.manual_seed(0)  # the random policy draws from the global generator
                if arm.policy is None:
                    kept, row = None, {"flops_ratio": 1.0, "top1": accuracy(backbone, test)}
                else:
                    try:
                        sparse = sc.sparsify(backbone, sparse_config(arm, budget, stages, path))
                    except BudgetError:
                        row = {"arm": name, "budget": budget, "reachable": False}
                        evals.put(row, path, None)
                        rows.append({**row, "tune_seconds": seconds})
                        progress.advance(task)
                        continue
                    # box precision only where the kept tokens are patches of the input (not merged, not fused)
                    drops = policy_class(arm.policy).reduction == "drop" and not arm.fuse
                    kept = kept_patches(sparse, probe) if drops else None
                    row = measure_selection(sparse, test, probe, boxes if drops else None, model.cfg.patch_size, kept)
                row = {"arm": name, "budget": budget, **row}
                shown = None
                if kept is not None and abs(budget - args.tune_budget) < 1e-9:
                    shown = maps[name] = [m[:6] for m in kept]
                evals.put(row, path, shown)
                rows.append({**row, "tune_seconds": seconds})
                progress.advance(task)
    report(rows, names, budgets, dense_top1, maps, test, args, console, len(test))


def report(rows, names, budgets, dense_top1, maps, test, args, console, n_test) -> None:
    name = args.name or f"fair_{args.dataset}" + ("_untuned" if args.steps == 0 else "")
    cells = []
    for arm in names:
        mine = {r["budget"]: r for r in rows if r["arm"] == arm}
        line = [arm]
        for b in (*budgets, 1.0):
            r = mine.get(b)
            if r is not None and not r.get("reachable", True):
                line.append("out of reach")
                continue
            text = "-" if r is None else f"{r['top1']:.2f}% @ {r['flops_ratio']:.3f}"
            if r is not None and "box_precision" in r:
                text += f" (box {r['box_precision']:.0f}%, x{r['lift']:.2f})"
            line.append(text)
        line.append(f"{next(r['tune_seconds'] for r in rows if r['arm'] == arm):.0f}")
        cells.append(line)
    share = next((r["box_share"] for r in rows if "box_share" in r), None)
    tuning = (f"Every arm fine-tuned {args.steps} steps of {BATCH} at budget {args.tune_budget:g} (backbone lr "
              f"{args.backbone_lr:g}, CE + {LOGIT_DISTILL} KL to the dense model), then evaluated at each budget."
              if args.steps else "No fine-tune: the training-free arms on the untuned backbone.")
    preamble = (f"Top-1 on {n_test} held-out {args.dataset} test images @ FLOPs ratio; dense backbone untuned "
                f"{dense_top1:.2f}%. {tuning} Stages of the drop policies: {args.stages}. "
                f"`python -m research.fair_policies --dataset {args.dataset} --steps {args.steps} "
                f"--tune-budget {args.tune_budget:g} --seed {args.seed} --arms '{args.arms}'`.")
    if share is not None:
        preamble += (f" In brackets: the share of the tokens kept after the last stage that lie on the garment's box "
                     f"({args.precision_images} test images), and that share over the box's share of all tokens "
                     f"({share:.1f}%): x1 is chance.")
    record = {"dataset": args.dataset, "test_images": n_test, "dense_top1": dense_top1, "steps": args.steps, "seed": args.seed,
              "batch": BATCH, "tune_budget": args.tune_budget, "backbone_lr": args.backbone_lr, "rows": rows,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    columns = ["arm", *[f"budget {b:g}" for b in budgets], "no pruning", "tune s"]
    write_results(console, args.out_dir, name, f"{args.dataset}: top-1 @ FLOPs, equal fine-tunes", columns, cells,
                  preamble, record)
    what = f"every arm tuned {args.steps} steps at {args.tune_budget:g}" if args.steps else "untuned backbone"
    control = {f"{r['arm']} (tuned)": r["top1"] for r in rows if ARMS[r["arm"]].policy is None and args.steps}
    save_accuracy_vs_flops([{"policy": r["arm"], **r} for r in rows if r["budget"] < 1.0 and "top1" in r],
                           args.out_dir / f"{name}.png", dense_top1, f"{args.dataset}: {what}", control)
    if maps:
        save_token_maps(test.images[:6], maps, args.out_dir / f"{name}_token_maps.png",
                        [FASHION_MNIST_CLASSES[int(y)] for y in test.labels[:6]])
    console.print(f"wrote {args.out_dir}/{name}.json, .md, .png")


if __name__ == "__main__":
    main()
