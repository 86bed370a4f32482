"""Time of the structure analysis (`eqtrace._structure._analyse`, uncached) per cell.

    python -m benchmarks.analysis_time

Reports, per cell, the first call (tracing and any compilation included) and the median of
three more. Run it on two checkouts (`PYTHONPATH=<checkout>/src`) to compare versions.
"""

import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import eqtrace
from eqtrace import nn
from eqtrace._structure import _analyse
from eqtrace.nn import surrogate


class TenOps(eqtrace.AbstractCell):
    """A user cell of ten element-wise steps around two ops: gates, a narrow band, an
    integer sign vector, a boolean mask and a refractory counter."""

    inp: eqx.nn.Linear
    rec: eqx.nn.Linear
    tau: jax.Array
    sign: jax.Array
    mask: jax.Array

    def __init__(self, n, *, key):
        k1, k2 = jr.split(key)
        self.inp = eqx.nn.Linear(32, n, key=k1)
        self.rec = eqx.nn.Linear(n, n, key=k2)
        self.tau = jnp.full(n, 10.0)
        self.sign = jnp.where(jnp.arange(n) % 4 == 0, -1, 1)
        self.mask = jnp.arange(n) % 7 != 0

    def init_state(self):
        return (jnp.zeros(self.tau.shape), jnp.zeros(self.tau.shape))

    def __call__(self, state, x):
        v, ref = state
        s = surrogate.triangle(v - 1.0, width=0.05)
        u = self.sign * self.inp(x) + jnp.where(self.mask, self.rec(s), 0.0)
        u = jnp.clip(u, -2.0, 2.0)
        decay = jnp.exp(-1.0 / self.tau)
        v = jnp.where(ref == 0, decay * v + (1 - decay) * jax.nn.relu(u), 0.0)
        ref = jnp.where(v > 1.0, 2.0, jnp.maximum(ref - 1.0, 0.0))
        return (v, ref), v

    def output(self, state):
        return state[0]


CELLS = {
    "GRU 32->128": lambda key: nn.GRUCell(32, 128, key=key),
    "LIF 100->256 rec+syn": lambda key: nn.LIF(100, 256, recurrent=True, synapse=True, key=key),
    "ten-op user cell 32->128": lambda key: TenOps(128, key=key),
}


def main():
    print(f"eqtrace from {eqtrace.__file__}")
    for name, make in CELLS.items():
        cell = make(jr.key(0))
        state = cell.init_state()
        x = jnp.zeros(cell.inp.in_features if isinstance(cell, TenOps) else cell.input_size)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            structure = _analyse(cell, state, x)
            jax.block_until_ready(jax.tree.leaves(structure.sites[0].owners))
            times.append(time.perf_counter() - start)
        print(
            f"{name:28s} first {times[0]:7.3f} s, then median {statistics.median(times[1:]):7.3f} s"
            f" ({len(structure.violations)} violation(s))"
        )


if __name__ == "__main__":
    main()
