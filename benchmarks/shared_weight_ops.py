"""The cost of ops whose weights reach several outputs under D-RTRL: time per step and trace
memory per sample against BPTT and exact RTRL (float32, batch 8, T = 50, a squared loss on
the state at every step, random targets).

    python -m benchmarks.shared_weight_ops

Two cells, `h' = 0.5 h + tanh(op_in(x) + op_rec(h))`:

- Conv1d: `eqx.nn.Conv1d(4 → 16, k = 5)` in, `Conv1d(16 → 16, k = 5)` recurrent, over 32
  positions (state `(16, 32)`, 512 neurons): D-RTRL keeps a trace per (position, kernel
  weight).
- Low-rank: `eqx.nn.Linear(32 → 128)` in, `eqtrace.nn.LowRankLinear(128 → 128, rank 8)`
  recurrent (no bias): D-RTRL keeps `V`'s trace per (output, weight), `(128, 8, 128)`.

Time per step is one jitted online (or BPTT) gradient over the sequence, after compilation,
divided by T; the BPTT baseline is `eqtrace.bptt_gradient` (plain `jax.grad` of a scanned
forward pass) in the same run.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import eqtrace
from eqtrace import nn


BATCH, LENGTH = 8, 50


class OpCell(eqtrace.AbstractCell):
    """`h' = 0.5 h + tanh(op_in(x) + op_rec(h))` on a state of any shape."""

    input_op: eqx.Module
    recurrent_op: eqx.Module
    shape: tuple[int, ...] = eqx.field(static=True)

    def init_state(self):
        return jnp.zeros(self.shape, jnp.float32)

    def __call__(self, state, x):
        h = 0.5 * state + jnp.tanh(self.input_op(x) + self.recurrent_op(state))
        return h, h


def conv_cell(key):
    k1, k2 = jr.split(key)
    conv_in = eqx.nn.Conv1d(4, 16, kernel_size=5, padding=2, dtype=jnp.float32, key=k1)
    conv_rec = eqx.nn.Conv1d(16, 16, kernel_size=5, padding=2, dtype=jnp.float32, key=k2)
    return OpCell(conv_in, conv_rec, (16, 32)), (4, 32)


def low_rank_cell(key):
    k1, k2 = jr.split(key)
    linear = eqx.nn.Linear(32, 128, dtype=jnp.float32, key=k1)
    low_rank = nn.LowRankLinear(128, 128, 8, use_bias=False, dtype=jnp.float32, key=k2)
    return OpCell(linear, low_rank, (128,)), (32,)


def _loss(y, target):
    return jnp.mean((y - target) ** 2)


def _time(fn, params, repeats=3):
    jax.block_until_ready(fn(params))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(params))
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(name, model, x_shape, key):
    k1, k2 = jr.split(key)
    xs = jr.normal(k1, (LENGTH, BATCH, *x_shape), jnp.float32)
    targets = jr.normal(k2, (LENGTH, BATCH, *model.shape), jnp.float32)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    state = jnp.zeros((BATCH, *model.shape), jnp.float32)

    @jax.jit
    def bptt(params):
        return eqtrace.bptt_gradient(forward, _loss, params, state, xs, targets)[1]

    bptt_time, reference = _time(bptt, params)
    print(f"| {name} · BPTT | — | {bptt_time / LENGTH * 1e3:.2f} | 1.0 | 1.000000 |", flush=True)
    for label, algorithm in (("D-RTRL", eqtrace.DRTRL()), ("RTRL", eqtrace.RTRL())):
        x = jnp.zeros(x_shape, jnp.float32)
        plan = eqtrace.prepare(algorithm, model, x)
        _, trace = eqtrace.init_state_and_trace(model, algorithm, BATCH, x=x)
        step = jax.vmap(
            eqtrace.make_online_step(algorithm, static, plan=plan), in_axes=(None, 0, 0, 0)
        )

        @jax.jit
        def online(params, step=step, trace=trace):
            return eqtrace.online_gradient(step, _loss, params, state, trace, xs, targets)[1]

        seconds, grads = _time(online, params)
        size = eqtrace.trace_size(algorithm, model, x)
        cosine = float(eqtrace.compare_gradients(grads, reference).overall_cosine)
        print(
            f"| {name} · {label} | {size.values:,} ({size.bytes / 2**20:.2f} MiB) | "
            f"{seconds / LENGTH * 1e3:.2f} | {seconds / bptt_time:.1f} | {cosine:.6f} |",
            flush=True,
        )


def main():
    print(f"batch {BATCH}, T = {LENGTH}, float32, {jax.devices()[0].platform}")
    print(
        "| cell · rule | trace per sample (values) | ms per step | time × BPTT | cosine to BPTT |"
    )
    print("| --- | --- | --- | --- | --- |")
    keys = jr.split(jr.key(0), 4)
    model, x_shape = conv_cell(keys[0])
    measure("Conv1d", model, x_shape, keys[1])
    model, x_shape = low_rank_cell(keys[2])
    measure("Low-rank", model, x_shape, keys[3])


if __name__ == "__main__":
    main()
