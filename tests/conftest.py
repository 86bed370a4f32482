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
import importlib.util
import pathlib

import jax
import jax.random as jr
import numpy as np
import pytest
from jaxtyping import _import_hook


def _exported_names() -> frozenset[str]:
    """The names eqtrace exports: those its public modules (`__init__.py` files and modules
    without a leading underscore) import or define at their top level (read from the source,
    before `eqtrace` is imported)."""
    (root,) = importlib.util.find_spec("eqtrace").submodule_search_locations
    names = set()
    for path in pathlib.Path(root).rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(part.startswith("_") and part != "__init__.py" for part in parts):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                names.update(alias.asname or alias.name for alias in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
    return frozenset(names)


class _PublicFunctionsTransformer(_import_hook.JaxtypingTransformer):
    """jaxtyping's import hook (`--jaxtyping-packages` in pyproject.toml) puts its beartype
    decorator on every function and class of `eqtrace`, and a nested `def` is decorated anew at
    every call of its parent: the structural analyses' helpers and closures, called per
    equation while a step is traced, took about a quarter of the suite's CPU time in these
    wrappers while checking nothing of the API. Here the public API is checked: every function
    eqtrace exports (`_exported_names`), every class it exports with its public methods
    (dunders included), and every annotated public closure (such as the step
    `make_online_step` returns). Internal code is not decorated: top-level functions and
    classes eqtrace does not export, `_private` functions, methods and classes, unannotated
    closures."""

    _exported = _exported_names()

    def visit_ClassDef(self, node):
        top = isinstance(self._parents[-1], ast.Module)
        if not node.name.startswith("_") and (not top or node.name in self._exported):
            return super().visit_ClassDef(node)
        self._no_type_check_level += 1
        try:
            return super().visit_ClassDef(node)
        finally:
            self._no_type_check_level -= 1

    def visit_FunctionDef(self, node):
        parent = self._parents[-1]
        arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
        annotated = node.returns is not None or any(a.annotation is not None for a in arguments)
        private = node.name.startswith("_") and not node.name.startswith("__")
        if isinstance(parent, ast.Module):
            checked = node.name in self._exported
        elif isinstance(parent, ast.ClassDef):
            checked = not private
        else:
            checked = annotated and not private
        if checked:
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
