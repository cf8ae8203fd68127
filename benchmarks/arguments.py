"""Command-line lists shared by the benchmark scripts: comma-separated names from a fixed set, refused in one line."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path


def comma_choices(text: str, choices: Iterable[str], what: str) -> list[str]:
    """The comma-separated names in `text`, each one of `choices`; an unknown one exits with one line naming it."""
    choices = list(choices)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise SystemExit(f"error: unknown {what} {unknown}; choose from {', '.join(choices)}")
    return names


def add_results_arguments(ap: argparse.ArgumentParser, default_name: str, study: str) -> None:
    """`--out-dir` (docs/results/`study`, the study's own folder) and `--name`, the results files' stem (`default_name`
    says what it defaults to)."""
    ap.add_argument("--out-dir", type=Path, default=Path("docs/results") / study)
    ap.add_argument("--name", help=f"results file stem (default: {default_name})")
