"""Smoke tests of `benchmarks/`: tiny configurations through the same code paths as the real
tables. No timing assertions (DESIGN.md §6)."""

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import hlo, run  # noqa: E402


TINY = ["--input", "3", "--hidden", "4", "--batch", "2", "--steps", "4", "--repeats", "1"]


def _rows(text: str) -> dict[str, list[str]]:
    """The table's rows by first cell (skipping the header and rule)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| algorithm"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("model", ["gru", "lif"])
def test_table_has_every_algorithm(model, capsys):
    results = run.main(["--model", model, *TINY, "--no-memory"])
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == list(run.ALGORITHMS)
    for name, cells in rows.items():
        assert cells[1] not in ("error", "skipped"), (name, results)


def test_rtrl_skipped_when_too_big(capsys):
    run.main(["--model", "gru", *TINY, "--no-memory", "--algorithms", "rtrl", "--rtrl-limit", "1"])
    out = capsys.readouterr().out
    assert _rows(out)["rtrl"][1] == "skipped"
    assert "note: rtrl skipped" in out


def test_memory_subprocess_and_sweep(tmp_path, capsys):
    # Two fresh worker processes, side by side: the memory path of both commands. (`forward`,
    # the quickest to compile; the workers build every algorithm through the same code.)
    plot = tmp_path / "sweep.png"
    results = run.main(
        ["--sweep-memory", "--model", "gru", *TINY, "--lengths", "2,4", "--algorithms",
         "forward", "--plot", str(plot)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert [(r["algorithm"], r["steps"]) for r in results] == [("forward", 2), ("forward", 4)]
    for r in results:
        assert "error" not in r, r
        assert r["peak_rss_mb"] > 0 and r["xla_temp_mb"] is not None
    assert "| forward   | 4 " in out
    pytest.importorskip("matplotlib")
    assert plot.exists()


def test_hlo_report(capsys):
    report = hlo.main(["--model", "gru", "--algorithm", "drtrl", "--hidden", "4", "--input", "3",
                       "--batch", "2"])  # fmt: skip
    assert "fusion kinds:" in report and "largest materialised buffers" in report
