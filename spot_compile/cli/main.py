"""`spot-compile`: a thin command line over the Python API.

Commands that take MODEL_FILE run that Python file to build the model: only use files you trust.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.markup import escape

from spot_compile.calibration.config import FINETUNE_GRAPHS, MASK_GRADIENTS, PRECISIONS, CalibrationConfig
from spot_compile.cli.options import (
    BENCH_FULL,
    BENCH_QUICK,
    FILE_HELP,
    merge_at_option,
    model_options,
    normalization_options,
    parse_stages,
    policy_option,
    policy_value,
)
from spot_compile.config import DEFAULT_POLICY
from spot_compile.data.preprocessing import AUGMENTATIONS
from spot_compile.errors import SpotError
from spot_compile.policies import policy_class, stages_help

# Off a terminal (a pipe, a job's log) rich would cut tables to 80 columns; a wide console keeps every cell whole.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)



# The calibration defaults, read by calibrate's options: the CLI and the API default alike.
DEFAULTS = CalibrationConfig()
class SpotGroup(click.Group):
    """Turns SpotError into a one-line message and exit code 2; --debug shows the traceback. click's own usage
    errors get the same `error:` prefix (click writes `Error:`), after its usage line and hint."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            if e.ctx is not None:
                click.echo(e.ctx.get_usage(), err=True)
                click.echo(f"Try '{e.ctx.command_path} --help' for help.\n", err=True)
            err_console.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            err_console.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpotError as e:
            if ctx.params.get("debug"):
                raise
            rank = int(os.environ.get("RANK", "0"))  # under torchrun every process says it; rank 0 unmarked
            err_console.print(f"[bold red]error{f' (rank {rank})' if rank else ''}:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            ctx.exit(2)


@click.group(cls=SpotGroup, help="Token reduction for Vision Transformers as a compiler pass, to a FLOPs budget: merging (the "
             "default), SPOT's learned pruning, class-attention and random pruning.")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def main(ctx, debug: bool) -> None:
    ctx.ensure_object(dict)["debug"] = debug


def _load(model_file: Path, model_name, factory, checkpoint=None) -> torch.nn.Module:
    from spot_compile.cli.userfile import load_model_file

    return load_model_file(model_file, model_name, factory, checkpoint)


@main.command(help=f"Find the attention blocks of a model without rewriting it. {FILE_HELP}")
@model_options
def inspect(model_file, model_name, factory, checkpoint, input_size) -> None:
    from spot_compile.cli.report import blocks_table
    from spot_compile.graph.blocks import find_blocks
    from spot_compile.graph.capture import capture
    from spot_compile.graph.inputs import example_input

    model = _load(model_file, model_name, factory, checkpoint)
    structure = find_blocks(capture(model, example_input(model, input_size)))
    console.print(blocks_table(structure))


@main.command(help=f"Sparsify a model to a FLOPs budget and report the plan. {FILE_HELP}")
@model_options
@click.option("--budget", type=float, default=0.6, show_default=True, help="Sparse FLOPs as a fraction of dense, in (0, 1].")
@click.option("--stages", default=None, help=f"Block indices to reduce tokens in front of, e.g. 3,6,9 (default, by policy: {stages_help()}).")
@policy_option
@merge_at_option
@click.option("--predictors", type=click.Path(path_type=Path), default=None, help="Calibrated SPOT predictors (spot-compile calibrate).")
@click.option("--fuse", is_flag=True, help="Fuse dropped tokens into one extra token (EViT-style).")
@click.option("--dump", is_flag=True, help="Print the rewritten graph: inserted nodes marked +, the model's nodes rewired to read them ~.")
@click.option("--dump-file", type=click.Path(path_type=Path), default=None, help="Write the rewritten graph to a file.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Save the sparsified model (spot_compile.load).")
@click.option("--export", "export_path", type=click.Path(path_type=Path), default=None,
              help="Write a self-contained torch.export program (.pt2, weights included; docs/serving.md).")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=None,
              help="Write an ONNX file (dynamic batch), checked in ONNX Runtime against the sparse model before it is "
                   "written (needs pip install 'spot-compile[onnx]'; docs/serving.md).")
@click.option("--latency/--no-latency", default=True, show_default=True, help="Measure eager latency, dense vs sparse, batch 8.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Labelled images (ImageFolder tree, its val/ or test/ part if it has one; or an IDX directory's test "
                   "split): report dense vs sparse top-1 and their top-1 agreement on them.")
@click.option("--eval-images", type=click.IntRange(min=1), default=2000, show_default=True,
              help="With --data: evaluate on a fixed random subset of this many images.")
@click.option("--token-maps", type=click.Path(path_type=Path), default=None,
              help="With --data: draw each stage's tokens over 6 of the images, one per class (PNG): kept and dropped "
                   "patches for a dropping policy, merged groups for merging.")
@normalization_options
def apply(model_file, model_name, factory, checkpoint, input_size, budget, stages, policy, merge_at, predictors, fuse, dump, dump_file, out,
          export_path, onnx_path, latency, data_dir, eval_images, token_maps, mean, std) -> None:
    from spot_compile import SparsifyConfig, save, sparsify
    from spot_compile.cli.bench import quick_latency
    from spot_compile.cli.report import dump_graph, plan_table
    from spot_compile.serialization.files import atomic_file, check_writable_file, write_text

    policy = policy or ("spot" if predictors else DEFAULT_POLICY)
    config = SparsifyConfig(budget=budget, stages=parse_stages(stages), policy=policy_value(policy, merge_at), fuse_pruned=fuse,
                            input_size=input_size, predictors=str(predictors) if predictors else None)
    for path, option in ((out, "--out"), (dump_file, "--dump-file"), (export_path, "--export"), (onnx_path, "--onnx"),
                         (token_maps, "--token-maps")):
        if path is not None:  # before the slow work, so that a typo costs nothing
            check_writable_file(path, option)
    if onnx_path is not None:
        from spot_compile.export.onnx import require_onnx_extra

        require_onnx_extra()
    if token_maps is not None and data_dir is None:
        raise click.BadParameter("draws over images from --data: give --data DIR too", param_hint="--token-maps")
    if token_maps is not None and fuse:
        raise click.BadParameter("draws the tokens each stage keeps; --fuse blends the dropped ones into an extra token "
                                 "that belongs to no patch: drop --fuse for the maps", param_hint="--token-maps")
    model = _load(model_file, model_name, factory, checkpoint)
    evaluation = _evaluation_data(model, data_dir, input_size, eval_images, mean, std) if data_dir is not None else None
    with console.status("capturing and rewriting the graph"):
        sparse = sparsify(model, config)
    timing = quick_latency(model, sparse) if latency else None
    console.print(plan_table(sparse.plan, timing, inside_blocks=getattr(sparse.config.policy_config, "merge_at", "") == "attention"))
    if dump:
        console.print(dump_graph(sparse.graph_module), soft_wrap=True)  # a graph line is not wrapped
    if dump_file:
        write_text(dump_file, dump_graph(sparse.graph_module).plain, "--dump-file")
        console.print(f"graph written to {dump_file}")
    if out:
        save(sparse, model, out)
        console.print(f"sparsified model written to {out}")
    if export_path:
        import torch

        program = sparse.export()
        with atomic_file(export_path, "--export") as f:  # a file object: a failed write is an error, not an abort
            torch.export.save(program, f)
        console.print(f"exported program written to {export_path} (load it with torch.export.load)")
    if onnx_path:
        with console.status("exporting to ONNX and checking it in ONNX Runtime"):
            written = sparse.to_onnx(onnx_path)
        console.print(written.describe())
    if evaluation is not None:
        _report_evaluation(model, sparse, *evaluation, token_maps)


def _evaluation_data(model, data_dir: Path, input_size, limit: int, mean, std):
    """The labelled images apply evaluates on (a fixed random subset of `limit`, through the model's eval transform:
    resize and centre crop as it declares) and their normalisation, read before the slow work."""
    from spot_compile.data.datasets import evaluation_images
    from spot_compile.data.preprocessing import model_preprocessing, parse_values
    from spot_compile.graph.inputs import example_input

    _, channels, height, width = example_input(model, input_size).shape
    pre = model_preprocessing(model, channels, (height, width), mean=parse_values(mean, "--mean"), std=parse_values(std, "--std"))
    data = evaluation_images(data_dir, pre, limit)
    console.print(f"evaluating on {len(data)} images of {data_dir} ({pre.describe()})")
    return data, pre.normalization


def _report_evaluation(model, sparse, data, normalization, token_maps: Path | None) -> None:
    from rich.table import Table

    from spot_compile.measure.accuracy import compare

    with console.status(f"dense and sparse on {len(data)} images"):
        result = compare(model, sparse, data, normalization)
    table = Table(title=f"on {result.images} of your images: what budget {sparse.plan.budget} costs")
    for col in ("dense top-1 %", "sparse top-1 %", "change (points)", "top-1 agreement with dense %"):
        table.add_column(col)
    table.add_row(f"{result.dense_top1:.2f}", f"{result.sparse_top1:.2f}", f"{result.sparse_top1 - result.dense_top1:+.2f}",
                  f"{result.agreement:.2f}")
    console.print(table)
    if token_maps is not None:
        from spot_compile.cli.visualize import kept_patches, merged_groups, one_per_class, save_token_maps

        chosen = one_per_class(data.labels, 6)
        images = data.images[chosen]
        draw = kept_patches if policy_class(sparse.plan.policy).reduction == "drop" else merged_groups
        maps = draw(sparse, normalization(images))
        save_token_maps(images, {sparse.plan.policy: maps}, token_maps, [data.classes[int(data.labels[i])] for i in chosen])
        console.print(f"token maps written to {token_maps} ({len(chosen)} images, one per class where there are enough)")


@main.command(help=f"Calibrate SPOT predictors for a model on image data (backbone frozen unless --finetune). {FILE_HELP}")
@model_options
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="IDX directory (MNIST-style files) or ImageFolder tree (train/CLASS/*.png).")
@click.option("--budget", type=float, default=DEFAULTS.budget, show_default=True)
@click.option("--rank-budget", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Calibrate the predictors' ranking at this budget's keep counts (default: --budget); validation and "
                   "the --finetune tune stay at --budget. The ranking is learned at the top-k boundary: rank where the last "
                   "stage keeps a little less than the object's share of the image (docs/spot.md, 'Which keep ratio to rank at').")
@click.option("--stages", default=None, help=f"Block indices, e.g. 3,6,9 (default: {policy_class('spot').stages_text}).")
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULTS.optim.epochs, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Optimizer steps per phase at most (with --finetune the backbone's tune is a second phase of as many: "
                   "twice this in all).")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.optim.batch_size, show_default=True)
@click.option("--lr", type=float, default=DEFAULTS.optim.lr, show_default=True)
@click.option("--noise", type=float, default=DEFAULTS.optim.noise, show_default=True, help="Scale of the Gumbel exploration noise on the scores.")
@click.option("--mask-gradient", type=click.Choice(MASK_GRADIENTS), default=DEFAULTS.experimental.mask_gradient, show_default=True,
              help="Where a score's gradient comes from: the stage's block alone (block), also every later block for "
                   "kept tokens (downstream; drifts with longer calibration, docs/research/mask_gradient.md), or every later block for all "
                   "tokens, dropped ones kept in the stream as masked keys (full, DynamicViT's).")
@click.option("--keep-ratio-weight", type=click.FloatRange(min=0), default=DEFAULTS.loss.keep_ratio, show_default=True,
              help="Weight of the loss that pulls each stage's mean keep probability to its keep ratio.")
@click.option("--signals", default=",".join(DEFAULTS.predictor.signals), show_default=True,
              help="Predictor inputs to use (drop one for an ablation).")
@click.option("--hidden", type=click.IntRange(min=1), default=DEFAULTS.predictor.hidden, show_default=True, help="Width of the predictor MLP.")
@click.option("--coverage", type=click.FloatRange(min=0), default=DEFAULTS.predictor.coverage, show_default=True,
              help="Weight of the fixed spatial coverage prior added to the relevance logits (docs/spot.md).")
@click.option("--val-size", type=click.IntRange(min=1), default=5000, show_default=True, help="Training images held out for validation.")
@click.option("--seed", type=int, default=DEFAULTS.optim.seed, show_default=True)
@click.option("--no-compile", is_flag=True, help="Run the calibration graph eagerly (slower; no compile wait).")
@click.option("--freeze-backbone/--finetune", default=True, show_default=True,
              help="Tune the backbone too (against a frozen dense teacher); the tuned weights go into the checkpoint.")
@click.option("--finetune-graph", type=click.Choice(FINETUNE_GRAPHS), default=None,
              help=f"With --finetune: tune the backbone after the predictors, as many steps again, through the sparse graph "
                   f"that will run (deployed), or together with them through the calibration graph (calibration; "
                   f"measured worse, docs/spot.md). Default: {FINETUNE_GRAPHS[0]}.")
@click.option("--backbone-lr", type=float, default=DEFAULTS.finetune.backbone_lr, show_default=True,
              help="Learning rate of the backbone with --finetune (the shipped predictors used 1e-3; docs/spot.md).")
@click.option("--token-distill", type=click.FloatRange(min=0), default=DEFAULTS.loss.token_distill, show_default=True,
              help="Weight of the loss that pulls the surviving tokens towards the dense model's (0: logits only).")
@click.option("--logit-distill", type=click.FloatRange(min=0), default=DEFAULTS.loss.logit_distill, show_default=True,
              help="Weight of the KL to the dense model's logits (0 with --token-distill 0: no teacher runs, each step is cheaper).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where to write the predictors.")
@click.option("--save-every", type=click.IntRange(min=1), default=None,
              help="Also write OUT.partial every this many steps (always after each epoch); a run started again resumes "
                   "from it exactly, also after a kill mid-epoch.")
@click.option("--val-every", type=click.IntRange(min=1), default=None,
              help="Also validate every this many steps, and keep the predictors of the best validation, not the last "
                   "(the calibration can drift from accuracy as it trains; docs/research/longer_calibration.md).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Data loader processes per training process (0: read images in the training process). Default: 0 on "
                   "the CPU (measured: loader processes there take cores from the training threads), else up to 8.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU when torch sees one, else the CPU).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULTS.run.precision, show_default=True,
              help="bf16 runs the forward passes under autocast (fast on GPUs and on CPUs with AVX512-BF16).")
@click.option("--augment", type=click.Choice(tuple(AUGMENTATIONS)), default=None,
              help="Training augmentation (default: what the model declares in pretrained_cfg['train_augment'], else "
                   "random-resized-crop).")
@normalization_options
def calibrate(model_file, model_name, factory, checkpoint, data_dir, signals, hidden, coverage, val_size, no_compile, freeze_backbone,
              augment, mean, std, **settings) -> None:
    from spot_compile.calibration.distributed import local_rank, resolve_device
    from spot_compile.calibration.trainer import calibrate as run
    from spot_compile.data.datasets import training_datasets
    from spot_compile.data.preprocessing import model_preprocessing, parse_values
    from spot_compile.graph.inputs import example_input
    from spot_compile.scorers.spot import PredictorConfig
    from spot_compile.serialization.files import check_writable_file

    if settings["finetune_graph"] is not None and freeze_backbone:
        raise click.BadParameter("only used with --finetune: add --finetune, or leave --finetune-graph out",
                                 param_hint="--finetune-graph")
    try:
        predictor = PredictorConfig(hidden=hidden, coverage=coverage, signals=tuple(s.strip() for s in signals.split(",") if s.strip()))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--signals") from None
    settings["device"] = resolve_device(settings["device"], local_rank())
    # every setting is checked here, before the model file runs and the data is read
    settings["stages"] = parse_stages(settings["stages"])
    config = CalibrationConfig.from_flat(**settings, predictor=predictor, compile=not no_compile, finetune=not freeze_backbone)
    check_writable_file(config.run.out, "--out")
    model = _load(model_file, model_name, factory, checkpoint)
    _, channels, height, width = example_input(model, config.input_size).shape
    preprocessing = model_preprocessing(model, channels, (height, width), mean=parse_values(mean, "--mean"),
                                        std=parse_values(std, "--std"), augment=augment)
    train, val = training_datasets(data_dir, val_size, seed=config.optim.seed, channels=channels)
    run(model, train, val, config, console=console, preprocessing=preprocessing)
    out = config.run.out
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, once
        console.print(f"predictors written to {out}; use them with: spot-compile apply {model_file} --predictors {out}")


@main.command(help=f"Time dense vs sparse, eager and compiled, as ratios measured in one run. {FILE_HELP}")
@model_options
@click.option("--budgets", default=None, help=f"Default {BENCH_FULL['budgets']} ({BENCH_QUICK['budgets']} with --quick); "
              "1.0 times the dense graph against itself: the noise check.")
@click.option("--batches", default=None, help=f"Default {BENCH_FULL['batches']} ({BENCH_QUICK['batches']} with --quick).")
@click.option("--modes", default=None,
              help="eager; compiled (torch.compile); frozen (torch.compile with Inductor weight freezing); aot "
                   "(AOTInductor shared library, the fastest at small batches, 20-45 s to build per graph); cudagraphs "
                   "(torch.compile mode reduce-overhead, GPU). Default: eager,compiled (and cudagraphs on CUDA).")
@click.option("--quick", is_flag=True, help=f"A few minutes: budgets {BENCH_QUICK['budgets']}, batches {BENCH_QUICK['batches']}, "
              f"{BENCH_QUICK['repeats']} repeats after {BENCH_QUICK['warmup']} warm-up (options given still win).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to time the model.")
@policy_option
@merge_at_option
@click.option("--predictors", type=click.Path(path_type=Path), default=None, help="Calibrated SPOT predictors.")
@click.option("--repeats", type=click.IntRange(min=1), default=None, help=f"Default {BENCH_FULL['repeats']}.")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help=f"Default {BENCH_FULL['warmup']}.")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None,
              help="Write latency_<name>.json, .md and speedup_<name>.png here, the JSON and Markdown again after every "
                   "batch measured (default: bench_<name>/ in the current directory).")
def bench(model_file, model_name, factory, checkpoint, input_size, budgets, batches, modes, quick, device, policy, merge_at, predictors,
          repeats, warmup, out_dir) -> None:
    from spot_compile.cli.bench import DEFAULT_MODES, MODES, report, run_bench
    from spot_compile.config import SparsifyConfig
    from spot_compile.serialization.files import check_writable_dir

    preset = BENCH_QUICK if quick else BENCH_FULL
    budgets, batches = budgets or preset["budgets"], batches or preset["batches"]
    repeats = repeats if repeats is not None else preset["repeats"]
    warmup = warmup if warmup is not None else preset["warmup"]
    try:
        budget_list = [float(b) for b in budgets.split(",")]
        batch_list = [int(b) for b in batches.split(",")]
    except ValueError:
        raise click.BadParameter("give comma-separated numbers, e.g. --budgets 1.0,0.6 --batches 1,8") from None
    if any(b < 1 for b in batch_list):
        raise click.BadParameter(f"batch sizes must be at least 1, got {batches}", param_hint="--batches")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_file.stem)  # timm:NAME -> timm_NAME
    out_dir = out_dir if out_dir is not None else Path(f"bench_{name}")
    check_writable_dir(out_dir, "--out-dir")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is available here; time on --device cpu", param_hint="--device")
    mode_list = tuple(m.strip() for m in modes.split(",")) if modes else DEFAULT_MODES[device]
    if set(mode_list) - set(MODES):
        raise click.BadParameter(f"modes are {', '.join(MODES)}; got {modes}", param_hint="--modes")
    if device == "cpu" and "cudagraphs" in mode_list:
        raise click.BadParameter("cudagraphs replays CUDA graphs: it needs --device cuda", param_hint="--modes")
    for b in budget_list:
        SparsifyConfig(budget=b)
    policy = policy or ("spot" if predictors else DEFAULT_POLICY)
    config = {"policy": policy_value(policy, merge_at), "predictors": str(predictors) if predictors else None}
    model = _load(model_file, model_name, factory, checkpoint).to(device)
    measured: list = []

    def keep(rows) -> None:  # after every batch: an interrupted run leaves what it measured
        measured[:] = rows
        report(rows, name, out_dir, console, repeats, warmup, policy, device, plot=False, quiet=True)

    try:
        rows = run_bench(model, budget_list, batch_list, mode_list, input_size, warmup, repeats, console, config, on_rows=keep)
    except KeyboardInterrupt:
        rows = measured
        console.print(f"[yellow]interrupted: reporting the {len(rows)} rows measured so far")
        if not rows:
            sys.exit(130)
    report(rows, name, out_dir, console, repeats, warmup, policy, device)


@main.command(help="Run the built-in default: the shipped Fashion-MNIST ViT, dense vs sparse, on the real test split.")
@click.option("--budget", type=float, default=0.6, show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Fashion-MNIST IDX directory (default: Debian's).")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Evaluate on the first N test images only (0: all 10k).")
def demo(budget, data, limit) -> None:
    from spot_compile.cli.demo import run_demo

    run_demo(console, budget=budget, data=data, limit=limit)


if __name__ == "__main__":
    sys.exit(main())
