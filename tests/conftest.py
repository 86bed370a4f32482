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
