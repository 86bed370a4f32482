"""Compile and time calls in this process, interleaved so that they share the machine's load."""

import resource
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


MB = 2**20
# Builds `(function, args)` for one timed call; called inside the error handling, so that a
# configuration that fails to trace is reported like one that fails to compile or run.
Job = Callable[[], tuple[Callable, tuple]]


def compile_call(function: Callable, *args) -> tuple[Any, float]:
    """Trace, lower and compile `function`: the compiled executable and the seconds it took."""
    start = time.perf_counter()
    compiled = jax.jit(function).lower(*args).compile()
    return compiled, time.perf_counter() - start


def xla_temp_megabytes(compiled) -> float | None:
    try:
        return compiled.memory_analysis().temp_size_in_bytes / MB
    except Exception:  # not every backend reports it
        return None


def time_interleaved(
    jobs: Mapping[str, Job], repeats: int, warmup: int, log=lambda s: None
) -> dict[str, dict]:
    """Compiles every job, then times them *interleaved*: `repeats` rounds, each running every
    job once (after `warmup` untimed runs each). On a shared machine the load changes over
    seconds; interleaving exposes all jobs to the same load, so the ratios of a round are
    comparable even when absolute times drift.

    **Returns:** per job `compile_s`, `times_s` (one per round, seconds per call),
    `xla_temp_mb`, `faults_mb` (the median over rounds of the memory first touched during a
    call: minor page faults times the page size) and `output` (what the last warm-up call
    returned), or `error` if it failed to trace, compile or run.
    """
    out: dict[str, dict] = {}
    compiled = {}
    for name, job in jobs.items():
        log(f"compiling {name} ...")
        try:
            function, args = job()
            executable, compile_s = compile_call(function, *args)
            output = None
            for _ in range(max(warmup, 1)):
                output = jax.block_until_ready(executable(*args))
        except Exception as error:  # report it in the table and go on with the others
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            out[name] = {"error": f"{type(error).__name__}: {message}"}
            log(f"{name} failed: {out[name]['error']}")
            continue
        compiled[name] = executable, args
        out[name] = {
            "compile_s": compile_s,
            "times_s": [],
            "xla_temp_mb": xla_temp_megabytes(executable),
            "output": output,
        }
    log(f"timing {', '.join(compiled)}: {repeats} interleaved rounds ...")
    faults: dict[str, list[int]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, (executable, args) in compiled.items():
            before = _minor_faults()
            start = time.perf_counter()
            jax.block_until_ready(executable(*args))
            out[name]["times_s"].append(time.perf_counter() - start)
            faults[name].append(_minor_faults() - before)
    for name, counts in faults.items():
        if counts:
            out[name]["faults_mb"] = statistics.median(counts) * resource.getpagesize() / MB
    return out


def _minor_faults() -> int:
    """The minor page faults of this process so far. A call whose buffers are freshly mapped
    (XLA:CPU's large temporaries come from `mmap` on every call, through glibc's `malloc`)
    faults once per page it first touches, which on a virtual machine costs microseconds per
    page; see "Profile" in benchmarks/README.md."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
