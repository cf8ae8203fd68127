"""One way a benchmark or study reports its rows: a table on the console, and beside it in the study's results
folder (docs/results/STUDY/) a JSON file (the raw rows, whatever else the run recorded, the table itself and how the
run was made), a Markdown file (a preamble, then the same table) and the folder's `manifest.json` (per results file:
the command, its arguments, the commit and the seed).

The Markdown regenerates from the JSON (`python -m benchmarks.result_table docs/results/STUDY/NAME.json`), so a
table is never edited by hand. `python -m benchmarks.result_table --manifest docs/results/STUDY` writes the manifest
of results made before runs recorded themselves, from git's history and the command each Markdown file quotes.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

MANIFEST = "manifest.json"


def write_results(console: Console, out_dir: Path, name: str, title: str, columns: list[str], cells: list[list[str]],
                  preamble: str, record: dict) -> None:
    """Prints `cells` under `columns` and writes `out_dir/name.json` (`record`, with the table and the run),
    `out_dir/name.md` and the entry of `name` in `out_dir/manifest.json`."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for row in cells:
        table.add_row(*row)
    console.print(table)
    run = this_run(record.get("seed"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({**record, "table": {"title": title, "columns": columns, "cells": cells, "preamble": preamble},
                                "run": run}, indent=1))
    regenerate(path)
    _update_manifest(out_dir, name, run)


def regenerate(path: Path) -> Path:
    """Writes the Markdown table of the results file `path` (.json) from the table it stores; returns the .md path."""
    stored = json.loads(Path(path).read_text())
    table = stored.get("table") if isinstance(stored, dict) else None
    if table is None:
        raise SystemExit(f"error: {path} stores no table (written before results stored theirs); run its study again")
    columns, cells = table["columns"], table["cells"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(row) + " |" for row in cells]
    md = Path(path).with_suffix(".md")
    md.write_text(table["preamble"] + "\n\n" + "\n".join(lines) + "\n")
    return md


def this_run(seed) -> dict:
    """How this process was started: the module or script, its arguments, the checkout's commit, the seed, the date."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    script = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    return {"command": script, "arguments": sys.argv[1:], "commit": _commit(), "seed": seed,
            "date": time.strftime("%Y-%m-%d")}


def _commit(path: Path | None = None) -> str | None:
    # the last commit that wrote the file, not one that only moved it
    args = ["git", "log", "--follow", "--diff-filter=AM", "-1", "--format=%h", "--", str(path)] if path else ["git", "rev-parse", "--short", "HEAD"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out or None


def _update_manifest(out_dir: Path, name: str, run: dict) -> None:
    path = out_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest[name] = run
    path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")


def manifest_from_history(folder: Path) -> dict:
    """The manifest of a results folder whose files did not record their runs: per results file, the last commit that
    wrote it, the command its Markdown file quotes (`python -m ...` or `python recipes/...`), and its stored seed."""
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else {}
    default = _study_command(folder.name)
    for result in sorted([*folder.glob("*.json"), *folder.glob("*.log")]):
        if result.name == MANIFEST or result.stem in manifest:
            continue
        stored = json.loads(result.read_text()) if result.suffix == ".json" else {}
        md = result.with_suffix(".md")
        quoted = re.search(r"`((?:\.venv/bin/)?python3? (?:-m [\w.]+|recipes/\w+\.py)[^`]*)`", md.read_text()) if md.is_file() else None
        words = quoted.group(1).split() if quoted else []
        command = " ".join(words[:3]) if words[1:2] == ["-m"] else " ".join(words[:2])
        manifest[result.stem] = {"command": command or default, "arguments": words[3 if words[1:2] == ["-m"] else 2:] or None,
                                 "commit": _commit(result), "seed": stored.get("seed") if isinstance(stored, dict) else None,
                                 "date": stored.get("date") if isinstance(stored, dict) else None}
    return dict(sorted(manifest.items()))


def _study_command(study: str) -> str | None:
    """How the study a results folder is named after is run (a benchmark, a research study or a recipe)."""
    root = Path(__file__).resolve().parents[1]
    for package in ("benchmarks", "research"):
        if (root / package / f"{study}.py").is_file():
            return f"python -m {package}.{study}"
    recipe = {"calibrate_shipped": "calibrate_shipped", "train_dense": "train_dense"}.get(study)
    return f"python recipes/{recipe}.py" if recipe else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="results files (.json) to regenerate, or folders with --manifest")
    ap.add_argument("--manifest", action="store_true", help="write each folder's manifest.json from git's history")
    args = ap.parse_args()
    for path in args.paths:
        if args.manifest:
            (path / MANIFEST).write_text(json.dumps(manifest_from_history(path), indent=1) + "\n")
            print(f"wrote {path / MANIFEST}")
        else:
            print(f"wrote {regenerate(path)}")


if __name__ == "__main__":
    main()
