"""The cost of ops whose weights reach several outputs under D-RTRL: time per step and trace
memory per sample against BPTT and exact RTRL (float32, batch 8, T = 50, a squared loss on
the state at every step, random targets).

    python -m benchmarks.shared_weight_ops           # the published sizes
    python -m benchmarks.shared_weight_ops --tiny    # tiny sizes, seconds (the smoke test)

Four cells, `h' = 0.5 h + tanh(op_in(x) + op_rec(h))`:

- Conv1d: `eqx.nn.Conv1d(4 → 16, k = 5)` in, `Conv1d(16 → 16, k = 5)` recurrent, over 32
  positions (state `(16, 32)`, 512 neurons): D-RTRL keeps a trace per (position, kernel
  weight).
- Low-rank: `eqx.nn.Linear(32 → 128)` in, `eqtrace.nn.LowRankLinear(128 → 128, rank 8)`
  recurrent (no bias): D-RTRL keeps `V`'s trace per (output, weight), `(128, 8, 128)`.
- Einsum: `eqtrace.nn.EinsumLinear("ti,oi->to")` in (4 → 16) and recurrent (16 → 16), one
  weight shared over 32 positions (state `(32, 16)`): a trace per (position, weight).
- Grouped: `eqx.nn.Linear(32 → 128)` in, `eqtrace.nn.GroupedLinear(128 → 128, 8 groups)`
  recurrent: each weight reaches one output, a weight-shaped trace.

Time per step is one jitted online (or BPTT) gradient over the sequence, after compilation,
divided by T; the BPTT baseline is `eqtrace.bptt_gradient` (plain `jax.grad` of a scanned
forward pass) in the same run.
"""

import argparse
import time
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import eqtrace
from eqtrace import nn


BATCH, LENGTH = 8, 50
# The cells' sizes: published, and tiny (`--tiny`, the smoke test).
SIZES = {
    "full": dict(channels_in=4, channels=16, kernel=5, positions=32, features=32, hidden=128,
                 rank=8, groups=8),
    "tiny": dict(channels_in=2, channels=2, kernel=3, positions=4, features=3, hidden=4,
                 rank=2, groups=2),
}  # fmt: skip


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


def conv_cell(key, channels_in, channels, kernel, positions, **_):
    k1, k2 = jr.split(key)
    pad = kernel // 2
    f32 = jnp.float32
    conv_in = eqx.nn.Conv1d(channels_in, channels, kernel, padding=pad, dtype=f32, key=k1)
    conv_rec = eqx.nn.Conv1d(channels, channels, kernel, padding=pad, dtype=f32, key=k2)
    return OpCell(conv_in, conv_rec, (channels, positions)), (channels_in, positions)


def low_rank_cell(key, features, hidden, rank, **_):
    k1, k2 = jr.split(key)
    linear = eqx.nn.Linear(features, hidden, dtype=jnp.float32, key=k1)
    low_rank = nn.LowRankLinear(hidden, hidden, rank, use_bias=False, dtype=jnp.float32, key=k2)
    return OpCell(linear, low_rank, (hidden,)), (features,)


def einsum_cell(key, channels_in, channels, positions, **_):
    k1, k2 = jr.split(key)
    shared = "ti,oi->to"  # one weight for every position
    op_in = nn.EinsumLinear(
        shared, (positions, channels_in), (channels, channels_in), dtype=jnp.float32, key=k1
    )
    op_rec = nn.EinsumLinear(
        shared, (positions, channels), (channels, channels), dtype=jnp.float32, key=k2
    )
    return OpCell(op_in, op_rec, (positions, channels)), (positions, channels_in)


def grouped_cell(key, features, hidden, groups, **_):
    k1, k2 = jr.split(key)
    linear = eqx.nn.Linear(features, hidden, dtype=jnp.float32, key=k1)
    grouped = nn.GroupedLinear(hidden, hidden, groups, dtype=jnp.float32, key=k2)
    return OpCell(linear, grouped, (hidden,)), (features,)


CELLS = {
    "Conv1d": conv_cell,
    "Low-rank": low_rank_cell,
    "Einsum": einsum_cell,
    "Grouped": grouped_cell,
}


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


RULES = {"drtrl": ("D-RTRL", eqtrace.DRTRL), "rtrl": ("RTRL", eqtrace.RTRL)}


def measure(name, model, x_shape, key, batch=BATCH, length=LENGTH, repeats=3, rules=RULES):
    """Prints one row per rule (BPTT, then `rules`) and returns them as dicts."""
    k1, k2 = jr.split(key)
    xs = jr.normal(k1, (length, batch, *x_shape), jnp.float32)
    targets = jr.normal(k2, (length, batch, *model.shape), jnp.float32)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    state = jnp.zeros((batch, *model.shape), jnp.float32)

    @jax.jit
    def bptt(params):
        return eqtrace.bptt_gradient(forward, _loss, params, state, xs, targets)[1]

    bptt_time, reference = _time(bptt, params, repeats)
    print(f"| {name} · BPTT | — | {bptt_time / length * 1e3:.2f} | 1.0 | 1.000000 |", flush=True)
    rows = [dict(cell=name, rule="BPTT", ms_per_step=bptt_time / length * 1e3, cosine=1.0)]
    for label, make in (RULES[r] for r in rules):
        algorithm = make()
        x = jnp.zeros(x_shape, jnp.float32)
        plan = eqtrace.prepare(algorithm, model, x)
        _, trace = eqtrace.init_state_and_trace(model, algorithm, batch, x=x)
        step = jax.vmap(
            eqtrace.make_online_step(algorithm, static, plan=plan), in_axes=(None, 0, 0, 0)
        )

        @jax.jit
        def online(params, step=step, trace=trace):
            return eqtrace.online_gradient(step, _loss, params, state, trace, xs, targets)[1]

        seconds, grads = _time(online, params, repeats)
        size = eqtrace.trace_size(algorithm, model, x)
        cosine = float(eqtrace.compare_gradients(grads, reference).overall_cosine)
        print(
            f"| {name} · {label} | {size.values:,} ({size.bytes / 2**20:.2f} MiB) | "
            f"{seconds / length * 1e3:.2f} | {seconds / bptt_time:.1f} | {cosine:.6f} |",
            flush=True,
        )
        rows.append(
            dict(
                cell=name,
                rule=label,
                trace_values=size.values,
                ms_per_step=seconds / length * 1e3,
                times_bptt=seconds / bptt_time,
                cosine=cosine,
            )
        )
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shared_weight_ops")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, batch 2, T = 3")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated")
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated, after BPTT")
    args = parser.parse_args(argv)
    sizes = SIZES["tiny" if args.tiny else "full"]
    batch, length, repeats = (2, 3, 1) if args.tiny else (BATCH, LENGTH, 3)
    print(f"batch {batch}, T = {length}, float32, {jax.devices()[0].platform}")
    print(
        "| cell · rule | trace per sample (values) | ms per step | time × BPTT | cosine to BPTT |"
    )
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for i, name in enumerate(args.cells.split(",")):
        # The keys of the first two cells are those of the published runs before the others.
        cell_key, data_key = (
            jr.split(jr.key(0), 4)[2 * i : 2 * i + 2]
            if i < 2
            else jr.split(jr.fold_in(jr.key(0), i))
        )
        model, x_shape = CELLS[name](cell_key, **sizes)
        rules = args.rules.split(",")
        rows += measure(name, model, x_shape, data_key, batch, length, repeats, rules)
    return rows


if __name__ == "__main__":
    main()
