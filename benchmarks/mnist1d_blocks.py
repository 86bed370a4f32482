"""D-RTRL's MNIST-1D-sized update, stepped and in blocks, in the same run.

    python -m benchmarks.mnist1d_blocks [--rule drtrl] [--hidden 128] [--batch 100] \\
        [--block 10] [--repeats 15]

The update of `benchmarks.tasks` on MNIST-1D (`GRUCell(1, H)` + `Linear(H, 10)`, 40 steps,
the loss on the last step): the first 39 steps advance the state and trace without gradient
work, the last one is differentiated (`jax.grad`). Each variant is timed interleaved with the
others; printed per variant: XLA's temporaries, the memory first touched per call (page
faults), the min and median time, and the median per-round ratio to the stepped update.
`(product)` is the block whose weight-trace sum is one matrix product whatever its length
(what blocks of more than `UNROLLED_BLOCK` steps do); the other block variants add rank-one
terms (blocks of up to `UNROLLED_BLOCK` steps). See "Profile" in benchmarks/README.md.
"""

import argparse
import resource
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import eqtrace
from eqtrace._algorithms import _drtrl


def _variants(rule: str, hidden: int, batch: int, block: int, length: int = 40):
    """`{name: (function, args)}` of the advance and the update, stepped and in blocks."""
    k1, k2, k3 = jr.split(jr.key(0), 3)
    model = eqtrace.nn.Sequential(
        [eqtrace.nn.GRUCell(1, hidden, key=k1), eqx.nn.Linear(hidden, 10, key=k2)]
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    algorithm = {"drtrl": eqtrace.DRTRL(), "snap1": eqtrace.SnAp1(), "eprop": eqtrace.EProp()}[rule]
    xs = jr.normal(k3, (length, batch, 1))
    labels = jnp.arange(batch) % 10
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=batch)
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    online_block = jax.vmap(
        eqtrace.make_online_block(algorithm, static), in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1)
    )

    def loss(y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(y, labels))

    def advance_steps(params, state, trace, xs):
        def body(carry, x):
            return step(params, *carry, x)[:2], None

        return jax.lax.scan(body, (state, trace), xs)[0]

    def advance_blocks(params, state, trace, xs):
        full, rest = divmod(xs.shape[0], block)
        blocks = xs[: full * block].reshape(full, block, *xs.shape[1:])

        def body(carry, x):
            return online_block(params, *carry, x)[:2], None

        state, trace = jax.lax.scan(body, (state, trace), blocks)[0]
        if rest:
            state, trace, _ = online_block(params, state, trace, xs[full * block :])
        return state, trace

    def update_steps(params, xs, state, trace):
        state, trace = advance_steps(params, state, trace, xs[:-1])
        return jax.grad(lambda p: loss(step(p, state, trace, xs[-1])[2]))(params)

    def update_blocks(params, xs, state, trace):
        state, trace = advance_blocks(params, state, trace, xs[:-1])
        return jax.grad(lambda p: loss(online_block(p, state, trace, xs[-1:])[2][0]))(params)

    args = (params, xs, state, trace)
    return {
        "advance, steps": (lambda p, x, s, t: advance_steps(p, s, t, x), args),
        "advance, blocks": (lambda p, x, s, t: advance_blocks(p, s, t, x), args),
        "update, steps": (update_steps, args),
        "update, blocks": (update_blocks, args),
    }


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mnist1d_blocks")
    parser.add_argument("--rule", choices=("drtrl", "snap1", "eprop"), default="drtrl")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    compiled = {}
    default = _drtrl.UNROLLED_BLOCK
    for suffix, threshold in (("", default), (" (product)", 0)):
        _drtrl.UNROLLED_BLOCK = threshold
        jax.clear_caches()  # the blocks are traced again with this threshold
        for name, (function, call_args) in _variants(
            args.rule, args.hidden, args.batch, args.block
        ).items():
            if suffix and "blocks" not in name:
                continue
            compiled[name + suffix] = jax.jit(function).lower(*call_args).compile(), call_args
    _drtrl.UNROLLED_BLOCK = default
    times: dict[str, list[float]] = {name: [] for name in compiled}
    faults: dict[str, list[int]] = {name: [] for name in compiled}
    for executable, call_args in compiled.values():
        jax.block_until_ready(executable(*call_args))
    for _ in range(args.repeats):
        for name, (executable, call_args) in compiled.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            jax.block_until_ready(executable(*call_args))
            times[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    page = resource.getpagesize() / 2**20
    results = {}
    print(f"# {args.rule}, GRU 1→{args.hidden}, batch {args.batch}, blocks of {args.block}")
    for name, (executable, _) in compiled.items():
        ratios = [t / s for t, s in zip(times[name], times["update, steps"])]
        results[name] = {
            "temp_mb": executable.memory_analysis().temp_size_in_bytes / 2**20,
            "faults_mb": statistics.median(faults[name]) * page,
            "min_ms": 1e3 * min(times[name]),
            "median_ms": 1e3 * statistics.median(times[name]),
            "x_update_steps": statistics.median(ratios),
        }
        r = results[name]
        print(
            f"{name:28s} temp {r['temp_mb']:6.1f} MB  faults {r['faults_mb']:6.1f} MB/call  "
            f"min {r['min_ms']:7.2f} ms  median {r['median_ms']:7.2f} ms  "
            f"× stepped update {r['x_update_steps']:.2f}"
        )
    return results


if __name__ == "__main__":
    main()
