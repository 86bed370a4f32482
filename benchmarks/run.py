"""Time and memory of eqtrace's online rules against plain-JAX baselines, in the same run.

    python -m benchmarks.run --model gru --input 32 --hidden 128 --batch 32 --steps 200 \
        --algorithms forward,bptt,rtrl,drtrl,ppprop
    python -m benchmarks.run --sweep-memory --model gru --lengths 100,1000,10000 \
        --algorithms bptt,drtrl,ppprop

Every algorithm computes the same thing: `Σ_t loss(y_t, target_t)` over a batch of sequences
(and, except `forward`, its gradient). Step `t` reads its inputs and targets from a small pool
of `POOL` steps (entry `t % POOL`), so no `(T, batch, input)` tensor exists and memory measures
the algorithm, not the data. Times are measured in this process; peak memory in a fresh
subprocess per (model, algorithm). See `benchmarks/README.md` for the columns.
"""

import argparse
import ctypes
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import eqtrace


# An online algorithm with the suffix "-block" runs `--block` steps per call of an online block
# (`eqtrace.make_online_block`): the same gradient, fewer passes over the trace.
ALGORITHMS = (
    "forward",
    "bptt",
    "rtrl",
    "drtrl",
    "drtrl-block",
    "drtrl-bf16",
    "ppprop",
    "ppprop-block",
)
MODELS = ("gru", "lif")
# Per-model defaults: (input, hidden, batch, steps).
DEFAULTS = {"gru": (32, 128, 32, 200), "lif": (100, 256, 32, 1000)}
ROOT = Path(__file__).resolve().parent.parent
MB = 2**20


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "gru"
    input: int = 32
    hidden: int = 128
    batch: int = 32
    steps: int = 200
    rank: float = 4.0
    block: int = 50
    # RTRL is skipped when its batched trace, batch·|h|·|θ| numbers, exceeds this.
    rtrl_limit: float = 1e7
    seed: int = 0

    def args(self) -> list[str]:
        """The command-line flags that rebuild this configuration (for the subprocesses)."""
        return [
            *("--model", self.model, "--input", str(self.input), "--hidden", str(self.hidden)),
            *("--batch", str(self.batch), "--steps", str(self.steps), "--rank", str(self.rank)),
            *("--block", str(self.block)),
            *("--rtrl-limit", str(self.rtrl_limit), "--seed", str(self.seed)),
        ]

    def describe(self) -> str:
        return (
            f"model={self.model} input={self.input} hidden={self.hidden} batch={self.batch} "
            f"steps={self.steps}"
        )


POOL = 64  # distinct steps of data; step t reads entry t % POOL


class Stream(eqx.Module):
    """The data of step `t`: entry `t % POOL` of small pools of inputs and targets.

    Memory stays constant in the sequence length (no `(T, batch, input)` tensor), and `x_t` is
    read from memory as real data would be. (Drawing `x_t` from a key inside the step does not
    work as a benchmark: XLA fuses the sampler into every consumer and recomputes it per weight.)
    """

    inputs: jax.Array  # (POOL, batch, input)
    targets: jax.Array  # (POOL, batch, outputs) regression targets, or (POOL, batch) labels
    classify: bool = eqx.field(static=True)

    def x(self, t: jax.Array) -> jax.Array:
        return self.inputs[t % self.inputs.shape[0]]

    def loss(self, y: jax.Array, t: jax.Array) -> jax.Array:
        """The batch-mean loss of step `t`: cross-entropy against the labels, or MSE."""
        target = self.targets[t % self.targets.shape[0]]
        if self.classify:
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(y, target))
        return jnp.mean((y - target) ** 2)


@dataclasses.dataclass(frozen=True)
class Problem:
    config: Config
    model: eqtrace.AbstractCell
    params: Any
    static: Any
    stream: Stream


def build_problem(config: Config) -> Problem:
    """The network, its parameters, and the data stream of `config.model`."""
    cell_key, readout_key, x_key, y_key = jr.split(jr.key(config.seed), 4)
    batch, n_in, hidden, n_out = config.batch, config.input, config.hidden, 10
    dtype = jnp.result_type(float)
    if config.model == "gru":
        model = eqtrace.nn.Sequential(
            [
                eqtrace.nn.GRUCell(n_in, hidden, key=cell_key),
                eqx.nn.Linear(hidden, n_out, key=readout_key),
            ]
        )
        # Gaussian inputs; mean squared error against random regression targets.
        stream = Stream(
            jr.normal(x_key, (POOL, batch, n_in), dtype),
            jr.normal(y_key, (POOL, batch, n_out), dtype),
            classify=False,
        )
    elif config.model == "lif":
        model = eqtrace.nn.Sequential(
            [
                eqtrace.nn.LIF(n_in, hidden, recurrent=True, synapse=True, key=cell_key),
                eqtrace.nn.LeakyReadout(hidden, n_out, key=readout_key),
            ]
        )
        # Poisson-like input spikes (10% per step); cross-entropy against random labels.
        stream = Stream(
            jr.bernoulli(x_key, 0.1, (POOL, batch, n_in)).astype(dtype),
            jr.randint(y_key, (POOL, batch), 0, n_out),
            classify=True,
        )
    else:
        raise ValueError(f"--model must be one of {MODELS}, but got {config.model!r}.")
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return Problem(config, model, params, static, stream)


class _OnStream(eqx.Module):
    """`step(params, state, [trace,] t)`: a batched step fed `x_t` from the stream. A module,
    so that the stream's arrays are traced arguments of the drivers' `filter_jit`."""

    step: Callable = eqx.field(static=True)
    stream: Stream

    def __call__(self, params, *carry_and_t):
        *carry, t = carry_and_t
        return self.step(params, *carry, self.stream.x(t))


def make_algorithm(name: str, config: Config) -> eqtrace.AbstractAlgorithm:
    name = name.removesuffix("-block")
    if name == "rtrl":
        return eqtrace.RTRL()
    if name == "drtrl":
        return eqtrace.DRTRL()
    if name == "drtrl-bf16":  # bfloat16 traces, float32 arithmetic: half the trace traffic.
        return eqtrace.DRTRL(trace_dtype=jnp.bfloat16)
    if name == "ppprop":
        return eqtrace.PPProp(rank=config.rank)
    raise ValueError(f"Unknown online algorithm {name!r}; expected one of {ALGORITHMS}.")


def sizes(problem: Problem) -> tuple[int, int]:
    """`(|h|, |θ|)`: the number of state and of parameter numbers of one sample."""
    n_state = sum(leaf.size for leaf in jax.tree.leaves(problem.model.init_state()))
    n_params = sum(leaf.size for leaf in jax.tree.leaves(problem.params))
    return n_state, n_params


def skip_reason(problem: Problem, name: str) -> str | None:
    """Why `name` is not run on this problem, or `None`."""
    if name.removesuffix("-block") != "rtrl":
        return None
    n_state, n_params = sizes(problem)
    numbers = problem.config.batch * n_state * n_params
    if numbers > problem.config.rtrl_limit:
        return (
            f"rtrl skipped: its trace would hold batch·|h|·|θ| = {problem.config.batch}·{n_state}"
            f"·{n_params} = {numbers:.2e} numbers > --rtrl-limit {problem.config.rtrl_limit:.0e} "
            "(and cost |h| times that per step)"
        )
    return None


def _batched_init_state(problem: Problem, params) -> Any:
    model = eqx.combine(params, problem.static)
    batch = problem.config.batch
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), model.init_state())


def make_runner(problem: Problem, name: str) -> Callable[[Any, Stream], Any]:
    """`run(params, stream)`: one batch of sequences of `config.steps` steps under `name`.

    `forward` returns the summed loss; every other algorithm returns `(loss, grads)`. The
    initial state and trace are built inside, so the inputs are the parameters and the data.
    """
    static, steps = problem.static, problem.config.steps
    forward_step = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))

    if name == "forward":

        def run_forward(params, stream):
            def body(carry, t):
                state, loss = carry
                state, y = forward_step(params, state, stream.x(t))
                return (state, loss + stream.loss(y, t)), None

            init = (_batched_init_state(problem, params), jnp.zeros((), jnp.result_type(float)))
            (_, loss), _ = jax.lax.scan(body, init, jnp.arange(steps))
            return loss

        return run_forward

    if name == "bptt":

        def run_bptt(params, stream):
            ts = jnp.arange(steps)
            state = _batched_init_state(problem, params)
            loss, grads, _ = eqtrace.bptt_gradient(
                _OnStream(forward_step, stream), stream.loss, params, state, ts, ts
            )
            return loss, grads

        return run_bptt

    algorithm = make_algorithm(name, problem.config)
    if name.endswith("-block"):
        block_size = problem.config.block
        online_step = jax.vmap(
            eqtrace.make_online_block(algorithm, static),
            in_axes=(None, 0, 0, 1),
            out_axes=(0, 0, 1),
        )
    else:
        block_size = None
        online_step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))

    def run_online(params, stream):
        ts = jnp.arange(steps)
        model = eqx.combine(params, static)
        state, trace = eqtrace.init_state_and_trace(model, algorithm, problem.config.batch)
        loss, grads, _, _ = eqtrace.online_gradient(
            _OnStream(online_step, stream),
            stream.loss,
            params,
            state,
            trace,
            ts,
            ts,
            block_size=block_size,
        )
        return loss, grads

    return run_online


def trace_megabytes(problem: Problem, name: str) -> float | None:
    """The size of the batched trace of an online algorithm (not run: shapes only)."""
    if name in ("forward", "bptt"):
        return None
    algorithm = make_algorithm(name, problem.config)
    model = problem.model
    try:
        _, trace = jax.eval_shape(
            lambda: eqtrace.init_state_and_trace(model, algorithm, problem.config.batch)
        )
    except Exception:  # the timing reports the error
        return None
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(trace)) / MB


def compile_runner(run: Callable, *args) -> tuple[Any, float]:
    """Trace, lower and compile `run`: the compiled executable and the seconds it took."""
    start = time.perf_counter()
    compiled = jax.jit(run).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _xla_temp_megabytes(compiled) -> float | None:
    try:
        return compiled.memory_analysis().temp_size_in_bytes / MB
    except Exception:  # not every backend reports it
        return None


def time_algorithms(
    problem: Problem, names: Sequence[str], repeats: int, warmup: int, log=lambda s: None
) -> dict[str, dict]:
    """Compiles every algorithm, then times them *interleaved*: `repeats` rounds, each running
    every algorithm once (after `warmup` untimed runs each). On a shared machine the load
    changes over seconds; interleaving exposes all algorithms to the same load, so the ratios
    of a round are comparable even when absolute times drift.

    **Returns:** per algorithm `compile_s`, `times_s` (one per round, seconds per call),
    `xla_temp_mb`, or `error` if it failed to compile or run.
    """
    args = (problem.params, problem.stream)
    out: dict[str, dict] = {}
    compiled = {}
    for name in names:
        log(f"compiling {name} ...")
        try:
            executable, compile_s = compile_runner(make_runner(problem, name), *args)
            for _ in range(warmup):
                jax.block_until_ready(executable(*args))
        except Exception as error:  # report it in the table and go on with the others
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            out[name] = {"error": f"{type(error).__name__}: {message}"}
            log(f"{name} failed: {out[name]['error']}")
            continue
        compiled[name] = executable
        out[name] = {
            "compile_s": compile_s,
            "times_s": [],
            "xla_temp_mb": _xla_temp_megabytes(executable),
        }
    log(f"timing {', '.join(compiled)}: {repeats} interleaved rounds ...")
    for _ in range(repeats):
        for name, executable in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(executable(*args))
            out[name]["times_s"].append(time.perf_counter() - start)
    return out


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> str:
    """The median over rounds of `times[i] / base[i]` (both measured in round `i`), with the
    quartiles of those ratios in brackets when there are at least 4 rounds."""
    ratios = [t / b for t, b in zip(times, base)]
    text = f"{statistics.median(ratios):.2f}"
    if len(ratios) >= 4:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        text += f" [{q1:.2f}–{q3:.2f}]"
    return text


# ---- Memory: one fresh process per measurement. ----


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb * (1 if sys.platform.startswith("linux") else 1 / 1024) / 1024


def _peak_rss_mb() -> float:
    """The peak RSS of this process so far: `VmHWM`, else `ru_maxrss`.

    `ru_maxrss` of a subprocess is not its own: across fork + exec Linux carries the parent's
    high-water mark into the child's (`signal->maxrss`), so every worker would report at least
    the RSS of the benchmark process that spawned it. `VmHWM` belongs to the new address space.
    """
    hwm = _proc_status_mb("VmHWM")
    return _maxrss_mb() if hwm is None else hwm


def _proc_status_mb(field: str) -> float | None:
    """`VmRSS` (resident now) or `VmHWM` (its high-water mark) from `/proc/self/status`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    """Return freed heap pages (e.g. the compiler's) to the OS, so the run cannot reuse them
    without showing up in the high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux: `5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory_here(config: Config, name: str) -> dict:
    """Peak memory of one run of `name`, in this (fresh) process.

    - `peak_rss_mb`: the peak RSS of the process (`VmHWM`, see `_peak_rss_mb`): imports,
      compilation and the runs.
    - `run_delta_mb`: how far a second run raised the RSS above what was resident just before
      it (the high-water mark `VmHWM` is reset after the first run, and freed heap pages
      returned to the OS): the algorithm's own working memory, without imports or compiling.
    - `xla_temp_mb`: XLA's static temporary buffer for the compiled program.
    """
    problem = build_problem(config)
    args = (problem.params, problem.stream)
    compiled, compile_s = compile_runner(make_runner(problem, name), *args)
    # A first run pays the runtime's one-off costs (thread pools, code pages); its buffers are
    # then freed and handed back to the OS, so the measured second run allocates afresh.
    out = compiled(*args)
    jax.block_until_ready(out)
    del out
    peak_before_run = _peak_rss_mb()
    _release_free_memory()
    reset = _reset_peak_rss()
    rss_before = _proc_status_mb("VmRSS")
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    run_s = time.perf_counter() - start
    # `VmHWM`, not `ru_maxrss`: the latter also keeps the peak of threads that exited before
    # the reset (e.g. the compiler's).
    run_peak = _proc_status_mb("VmHWM")
    delta = None
    if reset and rss_before is not None and run_peak is not None:
        delta = run_peak - rss_before
    return {
        "peak_rss_mb": max(peak_before_run, run_peak or 0.0),
        "run_delta_mb": delta,
        "xla_temp_mb": _xla_temp_megabytes(compiled),
        "compile_s": compile_s,
        "run_s": run_s,
    }


def measure_memory(config: Config, name: str, timeout: float) -> dict:
    """`measure_memory_here` in a fresh subprocess (so earlier runs do not count)."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--memory-worker", name, *config.args()]
    env = dict(os.environ)
    if jax.config.read("jax_enable_x64"):
        env["JAX_ENABLE_X64"] = "1"
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker failed ({proc.returncode}): {last}"}
    return json.loads(lines[-1])


def measure_memories(
    jobs: Sequence[tuple[Config, str]], workers: int, timeout: float
) -> list[dict]:
    """Runs the memory subprocesses, `workers` at a time (RSS is per process, so running them
    side by side does not change what each one measures)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda job: measure_memory(job[0], job[1], timeout), jobs))


# ---- Tables. ----


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


def run_table(
    config: Config,
    algorithms: Sequence[str],
    repeats: int = 5,
    warmup: int = 1,
    memory: bool = True,
    workers: int = 2,
    timeout: float = 1800.0,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> list[dict]:
    """Times every algorithm in this process, then measures its memory in subprocesses, and
    prints the table. Returns one dict per algorithm."""
    problem = build_problem(config)
    n_state, n_params = sizes(problem)
    results: list[dict] = []
    runnable = []
    for name in algorithms:
        reason = skip_reason(problem, name)
        if reason is not None:
            log(reason)
            results.append({"algorithm": name, "skipped": reason})
        else:
            results.append({"algorithm": name, "trace_mb": trace_megabytes(problem, name)})
            runnable.append(name)
    timings = time_algorithms(problem, runnable, repeats, warmup, log)
    for result in results:
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

    timed = {r["algorithm"]: r for r in results if "median_s" in r}
    header = [
        "algorithm", "compile s", "median ms", "min ms", "max ms", "× BPTT", "× forward",
        "peak RSS MB", "run Δ MB", "XLA temp MB", "trace MB",
    ]  # fmt: skip
    rows = []
    for r in results:
        if "skipped" in r or "error" in r:
            status = "skipped" if "skipped" in r else "error"
            rows.append([r["algorithm"], status, *["—"] * (len(header) - 2)])
            continue
        mem = r.get("memory", {})
        ratio = {
            base: paired_ratio(r["times_s"], timed[base]["times_s"]) if base in timed else None
            for base in ("bptt", "forward")
        }
        rows.append(
            [
                r["algorithm"],
                _fmt(r["compile_s"], ".2f"),
                _fmt(1e3 * r["median_s"], ".2f"),
                _fmt(1e3 * r["min_s"], ".2f"),
                _fmt(1e3 * r["max_s"], ".2f"),
                ratio["bptt"] or "—",
                ratio["forward"] or "—",
                _fmt(mem.get("peak_rss_mb"), ".0f") if "error" not in mem else mem["error"],
                _fmt(mem.get("run_delta_mb"), ".1f"),
                _fmt(mem.get("xla_temp_mb", r.get("xla_temp_mb")), ".1f"),
                _fmt(r.get("trace_mb"), ".1f"),
            ]
        )
    print(f"\n## {config.describe()}  (|h| = {n_state}, |θ| = {n_params}, {repeats} runs)")
    print(environment_line())
    print(
        "times: one call = the whole batch over all steps; × BPTT, × forward: median over the "
        "interleaved rounds of the per-round ratio [quartiles]\n"
    )
    print(markdown_table(header, rows))
    for r in results:
        if "skipped" in r:
            print(f"\nnote: {r['skipped']}")
        if "error" in r:
            print(f"\nerror: {r['algorithm']}: {r['error']}")
    sys.stdout.flush()
    return results


def sweep_memory(
    config: Config,
    algorithms: Sequence[str],
    lengths: Sequence[int],
    workers: int = 2,
    timeout: float = 3600.0,
    plot: str | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> list[dict]:
    """Peak memory per (algorithm, sequence length), each in a fresh process."""
    problem = build_problem(config)
    jobs, skipped = [], []
    for name in algorithms:
        reason = skip_reason(problem, name)
        if reason is not None:
            log(reason)
            skipped.append(reason)
            continue
        jobs += [(dataclasses.replace(config, steps=n), name) for n in lengths]
    log(f"measuring {len(jobs)} (algorithm, T) pairs in subprocesses ...")
    results = [
        {"algorithm": name, "steps": cfg.steps, **mem}
        for (cfg, name), mem in zip(jobs, measure_memories(jobs, workers, timeout))
    ]
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
    print(f"\n## memory sweep: {config.describe().rsplit(' steps=', 1)[0]}")
    print(environment_line())
    print()
    print(markdown_table(header, rows))
    for reason in skipped:
        print(f"\nnote: {reason}")
    sys.stdout.flush()
    if plot is not None:
        _plot_sweep(results, config, plot, log)
    return results


def _plot_sweep(results: list[dict], config: Config, path: str, log) -> None:
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
    fig.suptitle(config.describe().rsplit(" steps=", 1)[0])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"saved {path}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--model", choices=MODELS, default="gru")
    parser.add_argument("--input", type=int, help="input size (default: 32 gru, 100 lif)")
    parser.add_argument("--hidden", type=int, help="hidden size (default: 128 gru, 256 lif)")
    parser.add_argument("--batch", type=int, help="batch size (default: 32)")
    parser.add_argument("--steps", type=int, help="sequence length T (default: 200 gru, 1000 lif)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated")
    parser.add_argument("--rank", type=float, default=4.0, help="pp-prop rank, α = (r-1)/(r+1)")
    parser.add_argument("--block", type=int, default=50, help="steps per block for *-block")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--jobs", type=int, default=2, help="memory subprocesses at a time")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per subprocess, seconds")
    parser.add_argument("--rtrl-limit", type=float, default=1e7, help="max batch·|h|·|θ| for RTRL")
    parser.add_argument("--seed", type=int, default=0)
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
    )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    config = config_from_args(args)
    if args.memory_worker is not None:
        print(json.dumps(measure_memory_here(config, args.memory_worker)), flush=True)
        return []
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        raise SystemExit(f"--algorithms: unknown {unknown}; choose from {','.join(ALGORITHMS)}.")
    if args.sweep_memory:
        lengths = [int(n) for n in args.lengths.split(",")]
        results = sweep_memory(config, algorithms, lengths, args.jobs, args.timeout, args.plot)
    else:
        results = run_table(
            config, algorithms, args.repeats, args.warmup, not args.no_memory, args.jobs,
            args.timeout,
        )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": dataclasses.asdict(config), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
