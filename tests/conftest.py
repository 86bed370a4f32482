import os


# The suite is compile-bound (thousands of small programs on tiny arrays), so XLA:CPU is told
# to compile fast rather than to emit fast code: no LLVM optimisation of the kernels, and the
# classic elemental emitters instead of the newer fusion emitters. On the programs of
# tests/test_blocks.py, the two flags together compile in a third of the CPU time of the first
# alone and a quarter of XLA's defaults (5 s against 17 s and 23 s; `/tmp/ctime.py` in the
# note of issue 24). They change no result beyond round-off, which every tolerance here
# allows; the examples and benchmarks run with XLA's defaults when run on their own.
os.environ["XLA_FLAGS"] = " ".join(
    flag
    for flag in (
        os.environ.get("XLA_FLAGS"),
        "--xla_backend_optimization_level=0",
        "--xla_cpu_use_fusion_emitters=false",
    )
    if flag
)

import atexit
import shutil
import tempfile


# One persistent compilation cache for the whole run, shared by the pytest-xdist workers and
# the subprocesses the tests start (examples, restores in a new process): tests compile many
# identical programs (the same small cells under the same rules, in several files), and XLA's
# compilation is about half of the suite's time. The cache is keyed on the program and the
# compiler's flags, so it changes no result; a new directory per run, so a run never reads
# another's (the first process to load this file makes it, the workers inherit it).
if "EQTRACE_TEST_JAX_CACHE" not in os.environ:
    os.environ["EQTRACE_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="eqtrace-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["EQTRACE_TEST_JAX_CACHE"], ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["EQTRACE_TEST_JAX_CACHE"])
# Most programs here compile in milliseconds: cache them all.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import ast

import jax
import jax.random as jr
import numpy as np
import pytest
from jaxtyping import _import_hook


class _PublicFunctionsTransformer(_import_hook.JaxtypingTransformer):
    """jaxtyping's import hook (`--jaxtyping-packages` in pyproject.toml) puts its beartype
    decorator on every function of `eqtrace`, nested ones too, and a nested `def` is decorated
    anew at every call of its parent: the structural analyses' closures were decorated tens of
    thousands of times per test file, about a sixth of the suite's CPU time, checking nothing
    (they carry no annotations). Here a function nested in another is decorated only if it
    annotates an argument or its return, and private functions and methods (`_name`, not
    dunders) are not decorated: their wrappers cost a tenth of the suite's CPU time (the
    analyses call them per equation) and they are not the API. Every public function and
    method (dunders included) and every annotated public closure (such as the step
    `make_online_step` returns) is still checked."""

    def visit_FunctionDef(self, node):
        nested = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) for p in self._parents)
        arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
        annotated = node.returns is not None or any(a.annotation is not None for a in arguments)
        private = node.name.startswith("_") and not node.name.startswith("__")
        if (not nested or annotated) and not private:
            return super().visit_FunctionDef(node)
        self._no_type_check_level += 1
        try:
            return super().visit_FunctionDef(node)
        finally:
            self._no_type_check_level -= 1


# Read when each module is imported, after this file is (nothing imports `eqtrace` earlier).
_import_hook.JaxtypingTransformer = _PublicFunctionsTransformer


# Exactness assertions (RTRL == BPTT to 1e-9) need float64.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    keys = iter(jr.split(jr.key(1234), 10_000))
    return lambda: next(keys)


@pytest.fixture
def rng():
    # For data drawn with NumPy (`helpers.normal`): `jr.normal` would compile once per shape.
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops JAX's compiled executables after each test module. Each one holds memory
    mappings; a whole suite in one process reached the kernel's limit (`vm.max_map_count`,
    65 530 here) and LLVM then failed to allocate (a crash, not a failure). (Dropping them
    only past a budget of mappings saved no CPU time: measured on four test files.)"""
    yield
    jax.clear_caches()
