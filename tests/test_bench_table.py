"""BENCHMARKS.md's table is what bench/run.py writes from bench/results.json: a hand edit of
either, or a results file not regenerated into the table, fails here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402


def test_the_benchmarks_table_is_generated_from_the_results_file():
    text = (ROOT / "BENCHMARKS.md").read_text()
    head = text.partition(run.TABLE_END)[0]
    command = next(line for line in head.splitlines() if line.startswith("Command: ")).removeprefix("Command: ")
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    assert run.table(results, command) + "\n" == head


def test_a_plain_command_is_quoted_and_one_with_its_own_markdown_is_kept():
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    assert "Command: `python bench/run.py --rows a`\n" in run.table(results, "python bench/run.py --rows a")
    assert "Command: `a`; then `b`\n" in run.table(results, "`a`; then `b`")
