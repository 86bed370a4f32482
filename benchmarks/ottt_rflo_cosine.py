"""Gradient cosine to BPTT, trace size and time per sequence for OTTT and RFLO on small
benchmark lines (float32, one batch), next to D-RTRL on the same models.

    python -m benchmarks.ottt_rflo_cosine

OTTT: LIF(50 → 128, reset detached, subtract) + Linear(128 → 10), feed-forward and
recurrent, and two feed-forward layers. RFLO: D-RTRL on Murray's leaky RNN (α = 0.1,
50 → 128) with a `RandomFeedback` read-out (the cosine is to BPTT through that read-out, whose
backward pass uses the same B). Loss at each step on random targets, batch 16, T = 200.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import eqtrace
from eqtrace import nn


INPUT, HIDDEN, OUTPUT, BATCH, LENGTH = 50, 128, 10, 16, 200


class LeakyRNN(eqtrace.AbstractCell):
    """Murray's network: `h_t = (1 − α) h_{t-1} + α tanh(W h_{t-1} + W_in x_t + b)`."""

    input_op: nn.Linear
    recurrent_op: nn.Linear
    alpha: float = eqx.field(static=True)

    def __init__(self, alpha, *, key):
        ki, kr = jr.split(key)
        self.input_op = nn.Linear(INPUT, HIDDEN, key=ki)
        self.recurrent_op = nn.Linear(HIDDEN, HIDDEN, use_bias=False, key=kr)
        self.alpha = alpha

    def init_state(self):
        return jnp.zeros(HIDDEN)

    def __call__(self, state, x):
        u = self.input_op(x) + self.recurrent_op(state)
        h = (1 - self.alpha) * state + self.alpha * jnp.tanh(u)
        return h, h


def _loss(y, target):
    return jnp.mean((y - target) ** 2)


def _measure(name, algorithm, model, xs, targets):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, BATCH, x=xs[0, 0])
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
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
        for _ in range(3):
            result = jax.block_until_ready(fn(params))
        times[label] = (time.perf_counter() - start) / 3
        if label == "online":
            grads = result
        else:
            reference = result
    comparison = eqtrace.compare_gradients(grads, reference)
    size = eqtrace.trace_size(algorithm, model, xs[0, 0])
    print(
        f"| {name} | {float(comparison.overall_cosine):.4f} | {size.values:,} | "
        f"{times['online'] / times['bptt']:.2f} |"
    )


def main():
    key = jr.key(0)
    keys = iter(jr.split(key, 20))
    xs = 2.0 * jr.normal(next(keys), (LENGTH, BATCH, INPUT), jnp.float32)
    targets = jr.normal(next(keys), (LENGTH, BATCH, OUTPUT), jnp.float32)

    def lif(i, recurrent=False, detach=True):
        return nn.LIF(
            i, HIDDEN, recurrent=recurrent, detach_reset=detach, dtype=jnp.float32, key=next(keys)
        )

    def readout():
        return eqx.nn.Linear(HIDDEN, OUTPUT, dtype=jnp.float32, key=next(keys))

    print("| model · rule | cosine to BPTT | trace per sample (values) | time × BPTT |")
    print("| --- | --- | --- | --- |")
    ff = nn.Sequential([lif(INPUT), readout()])
    rec = nn.Sequential([lif(INPUT, recurrent=True), readout()])
    deep = nn.Sequential([lif(INPUT), lif(HIDDEN), readout()])
    for label, model in (("LIF feed-forward", ff), ("LIF recurrent", rec), ("2 × LIF", deep)):
        for rule_name, rule in (("OTTT", eqtrace.OTTT()), ("D-RTRL", eqtrace.DRTRL())):
            _measure(f"{label} · {rule_name}", rule, model, xs, targets)
    cell = LeakyRNN(0.1, key=next(keys))
    cell = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), cell)
    rflo = nn.Sequential([cell, nn.RandomFeedback(readout(), key=next(keys))])
    _measure("leaky RNN + RandomFeedback · RFLO (= D-RTRL)", eqtrace.DRTRL(), rflo, xs, targets)
    symmetric = nn.Sequential([cell, readout()])
    _measure("leaky RNN + Linear · D-RTRL", eqtrace.DRTRL(), symmetric, xs, targets)


if __name__ == "__main__":
    main()
