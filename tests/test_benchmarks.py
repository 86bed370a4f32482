"""Smoke tests of `benchmarks/`: the registry, and tiny configurations through the same code
paths as the real tables. No timing assertions (DESIGN.md §6)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import algorithms, hlo, run  # noqa: E402
from benchmarks.problems import Config, build_problem  # noqa: E402


TINY = ["--input", "3", "--hidden", "4", "--batch", "2", "--steps", "4", "--repeats", "1"]
# The names users type on the command line.
NAMES = (
    "forward", "bptt", "rtrl", "drtrl", "drtrl-block", "drtrl-bf16", "ppprop", "ppprop-block",
)  # fmt: skip


def _tiny(model: str) -> Config:
    return Config(model=model, input=3, hidden=4, batch=2, steps=4, block=2)


def _rows(text: str) -> dict[str, list[str]]:
    """The table's rows by first cell (skipping the header and rule)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| algorithm"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_registry():
    assert algorithms.ALGORITHMS == NAMES
    problem = build_problem(_tiny("gru"))
    for algorithm in algorithms.REGISTRY.values():
        if not algorithm.online:
            assert not algorithm.block and algorithm.trace_dtype is None
            continue
        rule = algorithm.make_rule(problem.config)
        assert algorithm.per_layer == type(rule).per_layer, algorithm.name
        # A block configuration carries the trace of a stepping one.
        assert not algorithms.stepping(algorithm).block, algorithm.name
        if algorithm.trace_dtype is not None:  # the factory really stores it
            dtypes = {leaf.dtype for leaf in jax.tree.leaves(algorithm.batched_trace(problem))}
            assert jnp.dtype(algorithm.trace_dtype) in dtypes, (algorithm.name, dtypes)
    assert algorithms.stepping(algorithms.get("drtrl-block")) is algorithms.get("drtrl")
    with pytest.raises(ValueError, match="Unknown algorithm"):
        algorithms.get("drtrl-blocks")


@pytest.mark.parametrize("model", ["gru", "lif"])
def test_every_algorithm_traces(model):
    # Shapes only: every configuration builds its runner and traces (compiling all of them
    # would take a minute).
    problem = build_problem(_tiny(model))
    for algorithm in algorithms.REGISTRY.values():
        out = jax.eval_shape(algorithm.runner(problem), problem.params, problem.stream)
        loss = out if algorithm.name == "forward" else out[0]
        assert loss.shape == (), algorithm.name


def test_tiny_run(capsys):
    names = "forward,bptt,drtrl,drtrl-block"
    results = run.main(["--model", "gru", *TINY, "--no-memory", "--algorithms", names, "--block",
                        "2"])  # fmt: skip
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == names.split(",")
    for name, cells in rows.items():
        assert cells[1] not in ("error", "skipped"), (name, results)


def test_rtrl_skipped_when_too_big(capsys):
    run.main(["--model", "gru", *TINY, "--no-memory", "--algorithms", "rtrl", "--rtrl-limit", "1"])
    out = capsys.readouterr().out
    assert _rows(out)["rtrl"][1] == "skipped"
    assert "note: rtrl skipped" in out


def test_memory_subprocess_and_sweep(tmp_path, capsys):
    # A fresh worker process: the memory path of both commands. (`forward`, the quickest to
    # compile; the workers build every algorithm through the same registry.)
    plot = tmp_path / "sweep.png"
    results = run.main(
        ["--sweep-memory", "--model", "gru", *TINY, "--lengths", "4", "--algorithms",
         "forward", "--plot", str(plot)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert [(r["algorithm"], r["steps"]) for r in results] == [("forward", 4)]
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
