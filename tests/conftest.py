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
