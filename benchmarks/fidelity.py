"""The cost of `train_online`'s fidelity monitor: training time with the monitor off and on.

    python -m benchmarks.fidelity --steps 200 --repeats 5

The problem is the benchmarks' `gru` line (`problems.py`: `Sequential([GRUCell(32, 128),
Linear(128, 10)])`, batch 32, mean squared error at every step), trained with D-RTRL and
`optax.adam` for `--steps` updates (one per step) by `eqtrace.train_online`. Each setting of the
monitor is one row; the times are taken in interleaved rounds (`timing.time_interleaved`), and
`× off` is the median over rounds of the per-round ratio to the row without a monitor,
with its quartiles (its range below 4 rounds).
"""

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

import eqtrace

from .problems import POOL, Config, build_problem
from .timing import time_interleaved


def _settings(rtrl: bool) -> dict[str, eqtrace.FidelityMonitor | None]:
    settings = {
        "off": None,
        "window, every 100": eqtrace.FidelityMonitor(every=100),
        "window, every 10": eqtrace.FidelityMonitor(every=10),
        "window of 10, every 100": eqtrace.FidelityMonitor(every=100, window=10),
    }
    if rtrl:  # RTRL's trace of one sample is |h|·|θ| numbers, updated at every step
        settings["rtrl, every 100, 1 sample"] = eqtrace.FidelityMonitor(
            every=100, samples=1, reference="rtrl"
        )
    return settings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fidelity")
    parser.add_argument("--input", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rtrl", action="store_true", help="also time the RTRL reference")
    args = parser.parse_args(argv)
    config = Config("gru", args.input, args.hidden, args.batch, args.steps)
    problem = build_problem(config)
    rule = eqtrace.DRTRL()
    step = jax.vmap(eqtrace.make_online_step(rule, problem.static), in_axes=(None, 0, 0, 0))
    state, trace = eqtrace.init_state_and_trace(problem.model, rule, batch_size=config.batch)
    index = jnp.arange(config.steps) % POOL
    xs, targets = problem.stream.inputs[index], problem.stream.targets[index]
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(problem.params)

    def loss(y, target):
        return jnp.mean((y - target) ** 2)

    def job(monitor):
        def run(params, opt_state, state, trace, xs, targets):
            out = eqtrace.train_online(
                step, loss, optimizer, params, opt_state, state, trace, xs, targets,
                monitor=monitor,
            )  # fmt: skip
            return out[0], out[4], out[5:]

        return lambda: (run, (problem.params, opt_state, state, trace, xs, targets))

    settings = _settings(args.rtrl)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    timings = time_interleaved({name: job(m) for name, m in settings.items()}, args.repeats, 1, log)
    off = timings["off"]["times_s"]
    print(f"## {config.describe()}, D-RTRL, adam, {args.repeats} interleaved rounds")
    print("| monitor | measured updates | median s | × off (quartiles) | last overall cosine |")
    print("| --- | --- | --- | --- | --- |")
    for name, monitor in settings.items():
        timing = timings[name]
        if "error" in timing:
            print(f"| {name} | | {timing['error']} | | |")
            continue
        times = timing["times_s"]
        ratios = [t / o for t, o in zip(times, off)]
        # Quartiles from 4 rounds on; the range below that.
        if len(ratios) >= 4:
            low, _, high = statistics.quantiles(ratios, n=4)
        else:
            low, high = min(ratios), max(ratios)
        measured = 0 if monitor is None else len(monitor.measured(config.steps))
        cosine = ""
        if monitor is not None:
            (fidelity,) = timing["output"][2]
            if len(fidelity.update):
                cosine = f"{float(fidelity.overall_cosine[-1]):.3f}"
        print(
            f"| {name} | {measured} | {statistics.median(times):.3f} | "
            f"{statistics.median(ratios):.2f} ({low:.2f}–{high:.2f}) | "
            f"{cosine} |"
        )


if __name__ == "__main__":
    main()
