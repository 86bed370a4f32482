"""Peak memory of one configuration, each measured in a fresh subprocess."""

import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax

from . import algorithms
from .problems import Config, build_problem
from .timing import compile_call, xla_temp_megabytes


ROOT = Path(__file__).resolve().parent.parent


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
    compiled, compile_s = compile_call(algorithms.get(name).runner(problem), *args)
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
        "xla_temp_mb": xla_temp_megabytes(compiled),
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
