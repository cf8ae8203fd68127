"""Results files: the Markdown table regenerates from the JSON, and every run is entered in its folder's manifest."""

import io
import json

from rich.console import Console

from benchmarks.result_table import regenerate, write_results


def test_a_results_table_regenerates_from_its_json_and_the_run_is_in_the_manifest(tmp_path):
    console = Console(file=io.StringIO())
    write_results(console, tmp_path, "demo", "a title", ["policy", "top-1 %"], [["merge", "85.92"], ["spot", "85.82"]],
                  "Preamble.", {"seed": 3, "rows": [1, 2]})
    md = (tmp_path / "demo.md").read_text()
    assert "| merge | 85.92 |" in md and md.startswith("Preamble.")
    (tmp_path / "demo.md").write_text("edited by hand")
    regenerate(tmp_path / "demo.json")
    assert (tmp_path / "demo.md").read_text() == md
    stored = json.loads((tmp_path / "demo.json").read_text())
    assert stored["rows"] == [1, 2] and stored["run"]["seed"] == 3
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["demo"]["seed"] == 3 and manifest["demo"]["command"].startswith("python")
    write_results(console, tmp_path, "other", "t", ["a"], [["1"]], "P.", {})
    assert set(json.loads((tmp_path / "manifest.json").read_text())) == {"demo", "other"}
