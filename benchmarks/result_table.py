"""One way a benchmark reports its rows: a table on the console, and beside it in the results folder a JSON file
(the raw rows and whatever else the run recorded) and a Markdown file (a preamble, then the same table)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def write_results(console: Console, out_dir: Path, name: str, title: str, columns: list[str], cells: list[list[str]],
                  preamble: str, record: dict) -> None:
    """Prints `cells` under `columns` and writes `out_dir/name.json` (`record`) and `out_dir/name.md`."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for row in cells:
        table.add_row(*row)
    console.print(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(row) + " |" for row in cells]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
    (out_dir / f"{name}.md").write_text(preamble + "\n\n" + "\n".join(lines) + "\n")
