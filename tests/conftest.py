import os


# The suite is compile-bound (thousands of small programs on tiny arrays): XLA's backend
# optimisations cost more time than they save here (a quarter of the suite's CPU time,
# measured on tests/test_diagonal.py and tests/test_blocks.py). They do not change what is
# computed; the examples and benchmarks run with XLA's defaults when run on their own.
os.environ["XLA_FLAGS"] = " ".join(
    flag for flag in (os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0") if flag
)

import jax
import jax.random as jr
import numpy as np
import pytest


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
    65 530 here) and LLVM then failed to allocate (a crash, not a failure)."""
    yield
    jax.clear_caches()
