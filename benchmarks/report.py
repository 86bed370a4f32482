"""The tables, the JSON record and the memory-sweep plot of a run."""

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
from collections.abc import Sequence

import jax

from .problems import Config


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def environment_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    device = jax.devices()[0]
    return (
        f"jax {jax.__version__}, {device.platform} ({device.device_kind}), "
        f"{os.cpu_count()} cores, python {platform.python_version()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}"
    )


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> str:
    """The median over rounds of `times[i] / base[i]` (both measured in round `i`), with the
    quartiles of those ratios in brackets when there are at least 4 rounds."""
    ratios = [t / b for t, b in zip(times, base)]
    text = f"{statistics.median(ratios):.2f}"
    if len(ratios) >= 4:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        text += f" [{q1:.2f}–{q3:.2f}]"
    return text


def run_table(config: Config, sizes: tuple[int, int], repeats: int, results: Sequence[dict]) -> str:
    """The table of `benchmarks.run`: one row per result (algorithms, then floors).

    A result holds `algorithm` (the row name), and either `skipped` or `error`, or the timing
    (`compile_s`, `times_s`, `median_s`, `min_s`, `max_s`, `xla_temp_mb`, `faults_mb`), optionally
    `memory`, `trace_mb` and `floor` (the row name of its trace-bandwidth floor).
    """
    timed = {r["algorithm"]: r for r in results if "median_s" in r}
    header = [
        "algorithm", "compile s", "median ms", "min ms", "max ms", "× BPTT", "× forward",
        "× floor", "cos BPTT", "peak RSS MB", "run Δ MB", "XLA temp MB", "faults MB",
        "trace MB",
    ]  # fmt: skip
    rows = []
    for r in results:
        if "skipped" in r or "error" in r:
            status = "skipped" if "skipped" in r else "error"
            rows.append([r["algorithm"], status, *["—"] * (len(header) - 2)])
            continue
        mem = r.get("memory", {})

        def ratio(base, r=r):
            if base not in timed:
                return "—"
            return paired_ratio(r["times_s"], timed[base]["times_s"])

        rows.append(
            [
                r["algorithm"],
                _fmt(r["compile_s"], ".2f"),
                _fmt(1e3 * r["median_s"], ".2f"),
                _fmt(1e3 * r["min_s"], ".2f"),
                _fmt(1e3 * r["max_s"], ".2f"),
                ratio("bptt"),
                ratio("forward"),
                ratio(r["floor"]) if "floor" in r else "—",
                _fmt(r.get("cos_bptt"), ".4f"),
                _fmt(mem.get("peak_rss_mb"), ".0f") if "error" not in mem else mem["error"],
                _fmt(mem.get("run_delta_mb"), ".1f"),
                _fmt(mem.get("xla_temp_mb", r.get("xla_temp_mb")), ".1f"),
                _fmt(r.get("faults_mb"), ".1f"),
                _fmt(r.get("trace_mb"), ".1f"),
            ]
        )
    n_state, n_params = sizes
    lines = [
        "",
        f"## {config.describe()}  (|h| = {n_state}, |θ| = {n_params}, {repeats} runs)",
        environment_line(),
        "times: one call = the whole batch over all steps; × BPTT, × forward, × floor: median "
        "over the interleaved rounds of the per-round ratio [quartiles]; a floor is one "
        "read-and-write pass over the rule's trace per step",
        "",
        markdown_table(header, rows),
    ]
    for r in results:
        if "skipped" in r:
            lines += ["", f"note: {r['skipped']}"]
        if "error" in r:
            lines += ["", f"error: {r['algorithm']}: {r['error']}"]
    return "\n".join(lines)


def sweep_table(
    config: Config, lengths: Sequence[int], results: Sequence[dict], skipped: Sequence[str]
) -> str:
    """The table of the memory sweep: one row per (algorithm, `T`), with ratios to the first
    length, and a note per skipped algorithm."""
    first = lengths[0]
    header = [
        "algorithm", "T", "peak RSS MB", f"× T={first}", "run Δ MB", f"× T={first}",
        "XLA temp MB", f"× T={first}", "run s",
    ]  # fmt: skip
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["algorithm"], str(r["steps"]), r["error"], *["—"] * 6])
            continue
        base = next(b for b in results if b["algorithm"] == r["algorithm"] and b["steps"] == first)

        def ratio(key, r=r, base=base):
            if "error" in base or r.get(key) is None or not base.get(key):
                return "—"
            return _fmt(r[key] / base[key], ".2f")

        rows.append(
            [
                r["algorithm"],
                str(r["steps"]),
                _fmt(r["peak_rss_mb"], ".0f"),
                ratio("peak_rss_mb"),
                _fmt(r["run_delta_mb"], ".1f"),
                ratio("run_delta_mb"),
                _fmt(r["xla_temp_mb"], ".1f"),
                ratio("xla_temp_mb"),
                _fmt(r["run_s"], ".2f"),
            ]
        )
    lines = [
        "",
        f"## memory sweep: {_without_steps(config)}",
        environment_line(),
        "",
        markdown_table(header, rows),
    ]
    for reason in skipped:
        lines += ["", f"note: {reason}"]
    return "\n".join(lines)


def _without_steps(config: Config) -> str:
    return config.describe().rsplit(" steps=", 1)[0]


def write_json(path: str, config: Config, results: Sequence[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"config": dataclasses.asdict(config), "results": results}, f, indent=1)


def plot_sweep(results: Sequence[dict], config: Config, path: str, log) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot.")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    keys = (("peak_rss_mb", "peak RSS (MB)"), ("run_delta_mb", "run Δ RSS (MB)"))
    for ax, (key, label) in zip(axes, keys):
        plotted = False
        for name in dict.fromkeys(r["algorithm"] for r in results):
            # Log axes: a zero (e.g. a run Δ below the RSS resolution) cannot be drawn.
            points = [
                (r["steps"], r[key])
                for r in results
                if r["algorithm"] == name and r.get(key) is not None and r[key] > 0
            ]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
                plotted = True
        ax.set(xscale="log", xlabel="sequence length T", ylabel=label)
        if plotted:
            ax.set_yscale("log")
            ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(_without_steps(config))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"saved {path}")
