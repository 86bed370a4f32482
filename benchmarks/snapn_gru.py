"""SnAp-n's memory per sample and gradient cosine to BPTT for n = 1, 2, 3 on a GRU and on an
RNN with a banded recurrent mask (float32, batch 8, T = 100, a linear read-out with a loss at
each step on random targets), next to SnAp1 and RTRL.

    python -m benchmarks.snapn_gru

GRU 32 → 128 (full recurrent weights: its pattern closes after one step, so SnAp-2 is
RTRL); banded RNN 32 → 128 with `|i − j| ≤ 4` (the band widens by 4 per step of n). Time
is one online gradient over the sequence (after compilation) over one BPTT gradient.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import eqtrace
from eqtrace import nn


INPUT, HIDDEN, OUTPUT, BATCH, LENGTH, BAND = 32, 128, 10, 8, 100, 4


class BandedRNN(eqtrace.AbstractCell):
    """`h' = tanh(W_in x + (W ⊙ B) h + b)`, `B` the band `|i − j| ≤ BAND`."""

    input_op: nn.Linear
    recurrent_op: nn.Linear
    input_size: int = eqx.field(static=True, default=INPUT)

    def __init__(self, *, key):
        ki, kr = jr.split(key)
        index = jnp.arange(HIDDEN)
        band = jnp.abs(index[:, None] - index[None, :]) <= BAND
        self.input_op = nn.Linear(INPUT, HIDDEN, dtype=jnp.float32, key=ki)
        self.recurrent_op = nn.Linear(
            HIDDEN, HIDDEN, use_bias=False, mask=band, dtype=jnp.float32, key=kr
        )

    def init_state(self):
        return jnp.zeros(HIDDEN, jnp.float32)

    def __call__(self, state, x):
        h = jnp.tanh(self.input_op(x) + self.recurrent_op(state))
        return h, h


def _loss(y, target):
    return jnp.mean((y - target) ** 2)


def _measure(name, algorithm, model, xs, targets):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    start = time.perf_counter()
    plan = eqtrace.prepare(algorithm, model, xs[0, 0])
    prepared = time.perf_counter() - start
    state, trace = eqtrace.init_state_and_trace(model, algorithm, BATCH, x=xs[0, 0])
    step = jax.vmap(eqtrace.make_online_step(algorithm, static, plan=plan), in_axes=(None, 0, 0, 0))
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))

    @jax.jit
    def online(params):
        return eqtrace.online_gradient(step, _loss, params, state, trace, xs, targets)[1]

    @jax.jit
    def bptt(params):
        return eqtrace.bptt_gradient(forward, _loss, params, state, xs, targets)[1]

    times = {}
    for label, fn in (("online", online), ("bptt", bptt)):
        jax.block_until_ready(fn(params))
        start = time.perf_counter()
        result = jax.block_until_ready(fn(params))
        times[label] = time.perf_counter() - start
        if label == "online":
            grads = result
        else:
            reference = result
    comparison = eqtrace.compare_gradients(grads, reference)
    size = eqtrace.trace_size(algorithm, model, xs[0, 0])
    kept = algorithm.mask_size(model, xs[0, 0]) if isinstance(algorithm, eqtrace.SnAp) else "—"
    kept = f"{kept:,}" if isinstance(kept, int) else kept
    print(
        f"| {name} | {kept} | {size.values:,} | {float(comparison.overall_cosine):.6f} | "
        f"{times['online'] / times['bptt']:.1f} | {prepared:.1f} s |",
        flush=True,
    )


def main():
    keys = iter(jr.split(jr.key(0), 20))
    xs = jr.normal(next(keys), (LENGTH, BATCH, INPUT), jnp.float32)
    targets = jr.normal(next(keys), (LENGTH, BATCH, OUTPUT), jnp.float32)

    def readout():
        return eqx.nn.Linear(HIDDEN, OUTPUT, dtype=jnp.float32, key=next(keys))

    print(
        "| model · rule | kept entries (mask) | trace per sample (values) | cosine to BPTT "
        "| time × BPTT | prepare |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    gru = nn.Sequential([nn.GRUCell(INPUT, HIDDEN, dtype=jnp.float32, key=next(keys)), readout()])
    banded = nn.Sequential([BandedRNN(key=next(keys)), readout()])
    for label, model, ns in (("GRU", gru, (1, 2, 3)), ("banded RNN", banded, (1, 2, 3, 4))):
        _measure(f"{label} · SnAp1", eqtrace.SnAp1(), model, xs, targets)
        for n in ns:
            _measure(f"{label} · SnAp({n})", eqtrace.SnAp(n), model, xs, targets)
        _measure(f"{label} · RTRL", eqtrace.RTRL(), model, xs, targets)


if __name__ == "__main__":
    main()
