"""Smoke tests of `benchmarks/`: the registry, and tiny configurations through the same code
paths as the real tables. No timing assertions (docs/architecture.md §4)."""

import dataclasses
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import algorithms, hlo, run  # noqa: E402
from benchmarks.floor import floors, make_floor  # noqa: E402
from benchmarks.problems import Config, build_problem  # noqa: E402


TINY = ["--input", "3", "--hidden", "4", "--batch", "2", "--steps", "4", "--repeats", "1"]
# The names users type on the command line.
NAMES = (
    "forward", "bptt", "rtrl", "drtrl", "drtrl-block", "drtrl-bf16", "snap1", "snap1-block",
    "eprop", "eprop-block", "ppprop", "ppprop-block", "uoro", "uoro-block", "drtrl-window",
    "ottt", "otpe", "snap2", "snap3", "dni",
)  # fmt: skip
# The rules that accept only some cells, and the "lif" options of the cells they accept.
REFUSING = {"ottt": {"detach_reset": True}, "otpe": {"detach_reset": True, "feedforward": True}}


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
    lif = build_problem(dataclasses.replace(_tiny("lif"), detach_reset=True, feedforward=True))
    for algorithm in algorithms.REGISTRY.values():
        if algorithm.name in REFUSING:  # refused on the GRU
            assert algorithm.may_refuse and algorithm.make_rule(lif.config).per_layer
            continue
        if not algorithm.online:
            assert not algorithm.block and algorithm.trace_dtype is None
            continue
        rule = algorithm.make_rule(problem.config)
        assert algorithm.per_layer == rule.per_layer, algorithm.name
        # A block configuration carries the trace of a stepping one (its floor).
        assert not algorithms.stepping(algorithm).block, algorithm.name
        if algorithm.trace_dtype is not None:  # the factory really stores it
            dtypes = {leaf.dtype for leaf in jax.tree.leaves(algorithm.batched_trace(problem))}
            assert jnp.dtype(algorithm.trace_dtype) in dtypes, (algorithm.name, dtypes)
    assert algorithms.stepping(algorithms.get("drtrl-block")) is algorithms.get("drtrl")
    assert algorithms.stepping(algorithms.get("drtrl-window")) is algorithms.get("drtrl")
    with pytest.raises(ValueError, match="Unknown algorithm"):
        algorithms.get("drtrl-blocks")


def test_one_floor_per_trace():
    names = ["forward", "drtrl", "drtrl-block", "drtrl-bf16", "ppprop-block"]
    by_floor = floors([algorithms.get(n) for n in names])
    assert list(by_floor) == ["drtrl floor", "drtrl-bf16 floor", "ppprop floor"]
    assert by_floor["ppprop floor"] is algorithms.get("ppprop")


@pytest.mark.parametrize("model", ["gru", "lif"])
def test_every_algorithm_traces(model):
    # Shapes only: every configuration builds its runner and traces (compiling all of them
    # would take a minute). The rules that refuse these cells say so, and trace once on the
    # cell they accept.
    problem = build_problem(_tiny(model))
    for algorithm in algorithms.REGISTRY.values():
        if algorithm.name in REFUSING:
            reason = algorithm.skip_reason(problem)
            assert reason is not None and reason.startswith(f"{algorithm.name} skipped: "), reason
            assert "cannot trace" in reason, reason
            if model == "gru":
                continue
            problem_ok = build_problem(
                dataclasses.replace(problem.config, **REFUSING[algorithm.name])
            )
            assert algorithm.skip_reason(problem_ok) is None
            out = jax.eval_shape(algorithm.runner(problem_ok), problem_ok.params, problem_ok.stream)
            assert out[0].shape == (), algorithm.name
            continue
        out = jax.eval_shape(algorithm.runner(problem), problem.params, problem.stream)
        loss = out if algorithm.name == "forward" else out[0]
        assert loss.shape == (), algorithm.name


def test_floor_reads_and_writes_every_leaf():
    # The loop body must write each trace leaf in full, every step: one fusion per leaf whose
    # output has the leaf's shape and dtype.
    problem = build_problem(dataclasses.replace(_tiny("lif"), steps=3))
    floor, args = make_floor(problem, algorithms.get("drtrl"))
    text = jax.jit(floor).lower(*args).compile().as_text()
    computations = hlo.parse_hlo(text)
    (loop,) = [ins for ins in computations["__entry__"] if ins["op"] == "while"]
    body = computations[re.search(r"body=%?([\w.\-]+)", loop["args"])[1]]
    written = [ins["shape"].split("{")[0] for ins in body if ins["op"] == "fusion"]
    for leaf in jax.tree.leaves(args[0]):
        dtype = jnp.dtype(leaf.dtype).name.replace("float", "f")
        shape = f"{dtype}[{','.join(map(str, leaf.shape))}]"
        assert shape in written, (shape, written)
    # An odd number of bit flips changes every number.
    changed = jax.tree.map(lambda a, b: bool(jnp.all(a != b)), jax.jit(floor)(*args), args[0])
    assert jax.tree.all(changed)


def test_tiny_run_with_floor(capsys):
    names = "forward,bptt,drtrl,drtrl-block"
    results = run.main(["--model", "gru", *TINY, "--no-memory", "--algorithms", names, "--block",
                        "2"])  # fmt: skip
    out = capsys.readouterr().out
    rows = _rows(out)
    assert list(rows) == [*names.split(","), "drtrl floor"]
    header = next(line for line in out.splitlines() if line.startswith("| algorithm"))
    column = [c.strip() for c in header.strip("|").split("|")].index("× floor")
    for name, cells in rows.items():
        assert cells[1] not in ("error", "skipped"), (name, results)
        assert (cells[column] == "—") == (name in ("forward", "bptt")), cells
    assert rows["drtrl floor"][column].startswith("1.00")
    assert [r["floor"] for r in results if "floor" in r] == ["drtrl floor"] * 3


def test_rtrl_skipped_when_too_big(capsys):
    run.main(["--model", "gru", *TINY, "--no-memory", "--algorithms", "rtrl,snap2", "--rtrl-limit",
              "1"])  # fmt: skip
    out = capsys.readouterr().out
    for name in ("rtrl", "snap2"):  # SnAp-2 by its trace's real size
        assert _rows(out)[name][1] == "skipped"
        assert f"note: {name} skipped" in out
        assert f"{name} floor" not in out


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


def test_hlo_report_of_a_block(capsys):
    report = hlo.main(["--model", "lif", "--algorithm", "eprop-block", "--block", "3", "--hidden",
                       "4", "--input", "3", "--batch", "2", "--time", "1"])  # fmt: skip
    assert "memory analysis (MB): temp" in report and "time per call" in report
    assert "# eprop-block block + gradient" in capsys.readouterr().out


def test_mnist1d_blocks(capsys):
    from benchmarks import mnist1d_blocks

    results = mnist1d_blocks.main(["--hidden", "4", "--batch", "2", "--repeats", "1"])
    assert set(results) == {"advance, steps", "advance, blocks", "update, steps",
                            "update, blocks", "advance, blocks (product)",
                            "update, blocks (product)"}  # fmt: skip
    assert "× stepped update" in capsys.readouterr().out


def test_shared_weight_ops(capsys):
    # The script's path on one tiny cell (the others are the same code; the ops themselves are
    # tested in test_shared_weight_ops.py).
    from benchmarks import shared_weight_ops

    rows = shared_weight_ops.main(["--tiny", "--rules", "drtrl", "--cells", "Grouped"])
    assert [(r["cell"], r["rule"]) for r in rows] == [("Grouped", "BPTT"), ("Grouped", "D-RTRL")]
    assert rows[1]["trace_values"] > 0 and 0 < rows[1]["cosine"] <= 1 + 1e-6
    assert "| Grouped · D-RTRL |" in capsys.readouterr().out
