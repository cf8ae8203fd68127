"""The options several commands share, and the parsing of their values (the commands are `cli.main`)."""

from __future__ import annotations

from pathlib import Path

import click

from spot_compile.config import DEFAULT_POLICY
from spot_compile.policies import policy_help, policy_names
from spot_compile.policy_configs import MERGE_AT, MergeConfig

FILE_HELP = (
    "MODEL_FILE is a Python file that is executed to build the model (only run files you trust). It must define "
    "a module-level `model`, or exactly one nn.Module instance or nn.Module subclass, or name one with --model / "
    "--factory. MODEL_FILE may instead name a model: timm:NAME (timm's architecture, random weights, or yours with "
    "--checkpoint FILE) or hf:DIR (a local save_pretrained folder); nothing is downloaded."
)

# bench's presets: the full grid, and --quick (a DeiT-Tiny in a few minutes on 2 cores)
BENCH_FULL = {"budgets": "1.0,0.8,0.6,0.5", "batches": "1,8,64", "repeats": 10, "warmup": 3}
BENCH_QUICK = {"budgets": "1.0,0.6", "batches": "1,8", "repeats": 5, "warmup": 2}


policy_option = click.option(
    "--policy", type=click.Choice(policy_names()), default=None,
    help=f"How tokens are reduced (default: spot with --predictors, else {DEFAULT_POLICY}). {policy_help()}.")


merge_at_option = click.option(
    "--merge-at", type=click.Choice(MERGE_AT), default=None,
    help="With --policy merge: block (the default: in front of each block, on the previous block's keys) or attention "
         "(ToMe as published: inside each block, between attention and MLP, on its own keys; every block merges).")


def policy_value(policy: str, merge_at: str | None):
    """The --policy value as the config takes it: the name, or a MergeConfig where --merge-at is given."""
    if merge_at is None:
        return policy
    if policy != "merge":
        raise click.BadParameter(f"it places merging, and policy {policy!r} does not merge: drop it, or use --policy merge",
                                 param_hint="--merge-at")
    return MergeConfig(merge_at=merge_at)


def parse_stages(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of block indices, e.g. 3,6,9") from None


def normalization_options(f):
    f = click.option("--std", default=None, help="Per-channel std of the model's input normalisation, e.g. 0.229,0.224,0.225 "
                     "(default: what the model declares; give with --mean).")(f)
    return click.option("--mean", default=None, help="Per-channel mean of the model's input normalisation, e.g. "
                        "0.485,0.456,0.406 (default: what the model declares, timm's pretrained_cfg).")(f)


def model_options(f):
    f = click.option("--input-size", type=int, default=None, help="Image side; default: what the model declares.")(f)
    f = click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                     help="Weights for a timm:NAME model (a state dict file; read with weights_only=True).")(f)
    f = click.option("--factory", default=None, help="Function in MODEL_FILE that returns the model.")(f)
    f = click.option("--model", "model_name", default=None, help="Name of the model object or class in MODEL_FILE.")(f)
    return click.argument("model_file", type=click.Path(path_type=Path))(f)
