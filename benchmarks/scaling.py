"""Cost as the work grows: time per sequence and memory of every rule against BPTT and each
rule's floor, along one axis at a time (hidden size, batch, sequence length), in one run.

    python -m benchmarks.scaling --model gru --axis hidden --values 64,128,256,512,1024 \
        --algorithms bptt,drtrl,drtrl-block,ppprop,uoro \
        --json benchmarks/results/scaling_hidden.json
    python -m benchmarks.scaling --model gru --axis batch --values 1,4,16,64,256
    python -m benchmarks.scaling --model gru --axis steps --values 50,200,1000 --memory
    python -m benchmarks.scaling --plot benchmarks/results/scaling_hidden.json   # PNG

Each point is `benchmarks.run`'s table for that configuration (the algorithms and their floors
timed interleaved in this process; with `--memory`, peak memory in fresh subprocesses). The
summary prints, per point, each rule's time as a multiple of BPTT's and of its own floor, its
trace in MB, and BPTT's stored states in MB (`T · batch · |h|` numbers, a lower bound of what
autodiff keeps); then, per rule, the smallest value of the axis where the trace is smaller
than BPTT's stored states (the memory crossover) and where the rule is at most as slow as
BPTT (the time crossover), if any within the sweep.
"""

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from . import report
from .problems import DEFAULTS, MODELS, Config, build_problem
from .run import run_table


AXES = ("hidden", "batch", "steps")


def _bptt_state_mb(config: Config) -> float:
    problem = build_problem(config)
    n_state, _ = problem.sizes()
    return config.steps * config.batch * n_state * 4 / 2**20  # float32


def sweep(
    base: Config,
    axis: str,
    values: Sequence[int],
    names: Sequence[str],
    repeats: int,
    memory: bool,
) -> list[dict]:
    points = []
    for value in values:
        config = dataclasses.replace(base, **{axis: value})
        print(f"\n### {axis} = {value}", flush=True)
        rows = run_table(config, names, repeats=repeats, warmup=1, memory=memory)
        points.append(
            {"value": value, "config": dataclasses.asdict(config), "rows": rows,
             "bptt_states_mb": _bptt_state_mb(config)}
        )  # fmt: skip
    return points


def _median(rows: list[dict], name: str | None) -> float | None:
    for row in rows:
        if row["algorithm"] == name:
            return row.get("median_s")
    return None


def summary(axis: str, points: list[dict]) -> str:
    """Per point and rule: × BPTT, × floor, trace MB; then the crossovers."""
    names = [
        r["algorithm"]
        for r in points[0]["rows"]
        if r.get("floor") is not None and r["algorithm"] != r.get("floor")
    ]
    header = [axis, "BPTT s", "BPTT states MB"] + [f"{n}: ×BPTT / ×floor / trace MB" for n in names]
    lines = []
    crossings: dict[str, dict[str, int | None]] = {n: {"memory": None, "time": None} for n in names}
    for point in points:
        rows = point["rows"]
        bptt = _median(rows, "bptt")
        cells = [
            str(point["value"]),
            report._fmt(bptt, ".4f"),
            report._fmt(point["bptt_states_mb"]),
        ]
        for name in names:
            row = next(r for r in rows if r["algorithm"] == name)
            t, floor = row.get("median_s"), _median(rows, row.get("floor"))
            by_bptt = t / bptt if t and bptt else None
            by_floor = t / floor if t and floor else None
            trace = row.get("trace_mb")
            cells.append(
                f"{report._fmt(by_bptt, '.2f')} / {report._fmt(by_floor, '.2f')} / "
                f"{report._fmt(trace, '.2f')}"
            )
            if trace is not None and trace < point["bptt_states_mb"]:
                crossings[name]["memory"] = crossings[name]["memory"] or point["value"]
            if by_bptt is not None and by_bptt <= 1.0:
                crossings[name]["time"] = crossings[name]["time"] or point["value"]
        lines.append(cells)
    table = report.markdown_table(header, lines)
    cross = report.markdown_table(
        ["rule", f"trace < BPTT's states from {axis} =", f"time ≤ BPTT's from {axis} ="],
        [[n, str(c["memory"] or "—"), str(c["time"] or "—")] for n, c in crossings.items()],
    )
    return f"{table}\n\n{cross}"


def plot(path: str) -> None:
    import matplotlib.pyplot as plt

    record = json.loads(open(path, encoding="utf-8").read())
    axis, points = record["axis"], record["points"]
    names = [
        r["algorithm"]
        for r in points[0]["rows"]
        if r.get("floor") is not None and r["algorithm"] != r.get("floor")
    ]
    xs = [p["value"] for p in points]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        ratios, traces = [], []
        for p in points:
            row = next(r for r in p["rows"] if r["algorithm"] == name)
            bptt = _median(p["rows"], "bptt")
            ratios.append(row["median_s"] / bptt if row.get("median_s") and bptt else None)
            traces.append(row.get("trace_mb"))
        ax_time.plot(xs, ratios, marker="o", label=name)
        ax_mem.plot(xs, traces, marker="o", label=name)
    ax_mem.plot(xs, [p["bptt_states_mb"] for p in points], "k--", label="BPTT states")
    ax_time.axhline(1.0, color="k", linestyle="--", linewidth=1)
    for ax, title in ((ax_time, "time × BPTT"), (ax_mem, "MB per batch")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_title(title)
    ax_time.legend(fontsize=7)
    fig.suptitle(record["describe"])
    fig.tight_layout()
    out = path.removesuffix(".json") + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="gru")
    parser.add_argument("--axis", choices=AXES, default="hidden")
    parser.add_argument("--values", default="64,128,256,512,1024")
    parser.add_argument("--algorithms", default="bptt,drtrl,drtrl-block,snap1,eprop,ppprop,uoro")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="peak memory in subprocesses")
    parser.add_argument("--json", help="write the points to this JSON file")
    parser.add_argument("--plot", metavar="JSON", help="plot a JSON written by --json, and exit")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    n_in, hidden, batch, steps = DEFAULTS[args.model]
    base = Config(model=args.model, input=n_in, hidden=hidden, batch=batch, steps=steps)
    values = [int(v) for v in args.values.split(",")]
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    if "bptt" not in names:
        names = ["bptt", *names]
    points = sweep(base, args.axis, values, names, args.repeats, args.memory)
    print(f"\n## scaling along {args.axis}: {base.describe()}\n{report.environment_line()}")
    print(summary(args.axis, points), flush=True)
    if args.json:
        record = {
            "command": " ".join(["python -m benchmarks.scaling", *(argv or sys.argv[1:])]),
            "axis": args.axis,
            "describe": base.describe(),
            "environment": report.environment_line(),
            "points": points,
        }
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=1, default=str)


if __name__ == "__main__":
    main()
