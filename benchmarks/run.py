"""Time and memory of eqtrace's online rules against plain-JAX baselines, in the same run.

    python -m benchmarks.run --model gru --input 32 --hidden 128 --batch 32 --steps 200 \
        --algorithms forward,bptt,rtrl,drtrl,ppprop
    python -m benchmarks.run --sweep-memory --model gru --lengths 100,1000,10000 \
        --algorithms bptt,drtrl,ppprop

Every algorithm computes the same thing: `Σ_t loss(y_t, target_t)` over a batch of sequences
(and, except `forward`, its gradient). Step `t` reads its inputs and targets from a small pool
of `POOL` steps (entry `t % POOL`), so no `(T, batch, input)` tensor exists and memory measures
the algorithm, not the data. Each online rule also gets a floor row: one read-and-write pass
over its trace per step. Times are measured in this process; peak memory in a fresh subprocess
per (model, algorithm). See `benchmarks/README.md` for the columns.
"""

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable, Sequence

import eqtrace

from . import algorithms, report
from .floor import floor_name, floors, make_floor
from .memory import ROOT, measure_memories, measure_memory_here
from .problems import DEFAULTS, MODELS, Config, Problem, build_problem
from .timing import Job, time_interleaved


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _trace_megabytes(problem: Problem, algorithm: algorithms.Algorithm) -> float | None:
    try:
        return algorithms.trace_megabytes(algorithm.batched_trace(problem))
    except Exception:  # the timing reports the error
        return None


def _add_cosines(results: list[dict], timings: dict[str, dict]) -> None:
    """Each rule's gradient cosine to BPTT's on the same batch (`cos_bptt`), when BPTT ran
    (online rules, and `dni`); pops the calls' outputs, which the JSON record does not keep."""
    outputs = {name: timing.pop("output", None) for name, timing in timings.items()}
    reference = outputs.get("bptt")
    for result in results:
        output = outputs.get(result["algorithm"])
        compared = result.get("floor") is not None or result["algorithm"] == "dni"
        if reference is not None and compared and output is not None:
            comparison = eqtrace.compare_gradients(output[1], reference[1])
            result["cos_bptt"] = float(comparison.overall_cosine)


def run_table(
    config: Config,
    names: Sequence[str],
    repeats: int = 5,
    warmup: int = 1,
    memory: bool = True,
    workers: int = 2,
    timeout: float = 1800.0,
    log: Callable[[str], None] = _stderr,
) -> list[dict]:
    """Times every algorithm and the floor of every online rule in this process, then measures
    the algorithms' memory in subprocesses, and prints the table. Returns one dict per row."""
    problem = build_problem(config)
    args = (problem.params, problem.stream)
    results: list[dict] = []
    runnable: list[algorithms.Algorithm] = []
    jobs: dict[str, Job] = {}
    for algorithm in map(algorithms.get, names):
        reason = algorithm.skip_reason(problem)
        if reason is not None:
            log(reason)
            results.append({"algorithm": algorithm.name, "skipped": reason})
            continue
        result: dict = {"algorithm": algorithm.name, "trace_mb": None}
        if algorithm.online:
            result.update(
                trace_mb=_trace_megabytes(problem, algorithm), floor=floor_name(algorithm)
            )
        results.append(result)
        runnable.append(algorithm)
        jobs[algorithm.name] = lambda a=algorithm: (a.runner(problem), args)
    floor_results = []
    for name, algorithm in floors(runnable).items():
        trace_mb = _trace_megabytes(problem, algorithm)
        floor_results.append({"algorithm": name, "trace_mb": trace_mb, "floor": name})
        jobs[name] = lambda a=algorithm: make_floor(problem, a)

    timings = time_interleaved(jobs, repeats, warmup, log)
    _add_cosines(results, timings)
    for result in results + floor_results:
        result.update(timings.get(result["algorithm"], {}))
        if result.get("times_s"):
            times = result["times_s"]
            result.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times))
    if memory:
        todo = [r for r in results if "skipped" not in r and "error" not in r]
        log(f"measuring peak memory of {len(todo)} algorithms in subprocesses ...")
        for result, mem in zip(
            todo, measure_memories([(config, r["algorithm"]) for r in todo], workers, timeout)
        ):
            result["memory"] = mem
    results += floor_results
    print(report.run_table(config, problem.sizes(), repeats, results), flush=True)
    return results


def sweep_memory(
    config: Config,
    names: Sequence[str],
    lengths: Sequence[int],
    workers: int = 2,
    timeout: float = 3600.0,
    plot: str | None = None,
    log: Callable[[str], None] = _stderr,
) -> list[dict]:
    """Peak memory per (algorithm, sequence length), each in a fresh process."""
    problem = build_problem(config)
    jobs, skipped = [], []
    for algorithm in map(algorithms.get, names):
        reason = algorithm.skip_reason(problem)
        if reason is not None:
            log(reason)
            skipped.append(reason)
            continue
        jobs += [(dataclasses.replace(config, steps=n), algorithm.name) for n in lengths]
    log(f"measuring {len(jobs)} (algorithm, T) pairs in subprocesses ...")
    results = [
        {"algorithm": name, "steps": cfg.steps, **mem}
        for (cfg, name), mem in zip(jobs, measure_memories(jobs, workers, timeout))
    ]
    print(report.sweep_table(config, lengths, results, skipped), flush=True)
    if plot is not None:
        report.plot_sweep(results, config, plot, log)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--model", choices=MODELS, default="gru")
    parser.add_argument("--input", type=int, help="input size (default: 32 gru, 100 lif)")
    parser.add_argument("--hidden", type=int, help="hidden size (default: 128 gru, 256 lif)")
    parser.add_argument("--batch", type=int, help="batch size (default: 32)")
    parser.add_argument("--steps", type=int, help="sequence length T (default: 200 gru, 1000 lif)")
    parser.add_argument(
        "--algorithms", default=",".join(algorithms.ALGORITHMS), help="comma-separated"
    )
    parser.add_argument("--rank", type=float, default=4.0, help="pp-prop rank, α = (r-1)/(r+1)")
    parser.add_argument("--block", type=int, default=50, help="steps per block for *-block")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--jobs", type=int, default=2, help="memory subprocesses at a time")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per subprocess, seconds")
    parser.add_argument("--rtrl-limit", type=float, default=1e7, help="max batch·|h|·|θ| for RTRL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--detach-reset", action="store_true", help="lif: the reset detached (OTTT needs it)"
    )
    parser.add_argument(
        "--feedforward", action="store_true", help="lif: no recurrent weights (OTPE needs it)"
    )
    parser.add_argument("--sweep-memory", action="store_true", help="memory versus T")
    parser.add_argument("--lengths", default="100,1000,10000", help="T values for the sweep")
    parser.add_argument(
        "--plot", default=str(ROOT / "benchmarks" / "memory_sweep.png"), help="sweep plot path"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--memory-worker", metavar="ALGORITHM", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    n_in, hidden, batch, steps = DEFAULTS[args.model]
    return Config(
        model=args.model,
        input=n_in if args.input is None else args.input,
        hidden=hidden if args.hidden is None else args.hidden,
        batch=batch if args.batch is None else args.batch,
        steps=steps if args.steps is None else args.steps,
        rank=args.rank,
        block=args.block,
        rtrl_limit=args.rtrl_limit,
        seed=args.seed,
        detach_reset=args.detach_reset,
        feedforward=args.feedforward,
    )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    config = config_from_args(args)
    if args.memory_worker is not None:
        print(json.dumps(measure_memory_here(config, args.memory_worker)), flush=True)
        return []
    names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(names) - set(algorithms.ALGORITHMS))
    if unknown:
        raise SystemExit(
            f"--algorithms: unknown {unknown}; choose from {','.join(algorithms.ALGORITHMS)}."
        )
    if args.sweep_memory:
        lengths = [int(n) for n in args.lengths.split(",")]
        results = sweep_memory(config, names, lengths, args.jobs, args.timeout, args.plot)
    else:
        results = run_table(
            config, names, args.repeats, args.warmup, not args.no_memory, args.jobs,
            args.timeout,
        )  # fmt: skip
    if args.json:
        report.write_json(args.json, config, results)
    return results


if __name__ == "__main__":
    main()
