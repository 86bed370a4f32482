"""`LowRankRTRL`'s error to exact RTRL against its rank, on random cells: a tanh RNN, a GRU, a
recurrent LIF with a synaptic current and a recurrent ALIF (float64, a linear read-out, a squared
loss at every step on random targets, the online gradient summed over the sequence).

    python -m benchmarks.rank_curve [--hidden 16] [--length 50] [--seeds 3] [--base drtrl]

The table of docs/algorithms/lowrank.md: `--hidden 32 --length 50 --seeds 2`.

Per cell and rank: the relative error `‖g − g_RTRL‖ / ‖g_RTRL‖` and the cosine of the online
gradient `g` to RTRL's (which equals BPTT's), as the mean over `--seeds` random cells and
sequences (the worst seed in brackets), the trace per sample in values, and the time of one
online gradient over the sequence (jitted, after compilation; the median over the seeds) over
the base rule's in the same run. Rank 0 is the base
rule; the last row of each cell is its full rank (`|h|`, the number of state values), exact
RTRL.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np


jax.config.update("jax_enable_x64", True)

import eqtrace  # noqa: E402
from eqtrace import nn  # noqa: E402
from eqtrace.nn import surrogate  # noqa: E402


INPUT, OUTPUT = 4, 3

CELLS = {
    "tanh RNN": lambda h, key: nn.RNNCell(INPUT, h, key=key),
    "GRU": lambda h, key: nn.GRUCell(INPUT, h, key=key),
    "LIF (recurrent, synapse)": lambda h, key: nn.LIF(
        INPUT, h, recurrent=True, synapse=True, tau_mem=10.0, tau_syn=5.0, key=key
    ),
    "ALIF (recurrent)": lambda h, key: nn.ALIF(
        INPUT, h, recurrent=True, beta=0.5, tau_adapt=30, surrogate=surrogate.Arctan(), key=key
    ),
}


def _loss(y, target):
    return jnp.sum((y - target) ** 2)


def _gradient(rule, model, xs, targets):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    plan = eqtrace.prepare(rule, model, xs[0])
    state = model.init_state()
    trace = rule.init_trace(model, state, plan=plan)
    step = eqtrace.make_online_step(rule, static, plan=plan)
    gradient = jax.jit(
        lambda p: eqtrace.online_gradient(step, _loss, p, state, trace, xs, targets)[1]
    )
    jax.block_until_ready(gradient(params))  # compiled
    start = time.perf_counter()
    grads = jax.block_until_ready(gradient(params))
    return jax.flatten_util.ravel_pytree(grads)[0], time.perf_counter() - start


def _problem(make, hidden, length, key):
    k_cell, k_out, k_x, k_y = jr.split(key, 4)
    model = nn.Sequential([make(hidden, k_cell), eqx.nn.Linear(hidden, OUTPUT, key=k_out)])
    # Spiking cells get a drive that makes them spike now and then.
    xs = 2.0 * jr.normal(k_x, (length, INPUT))
    targets = jr.normal(k_y, (length, OUTPUT))
    return model, xs, targets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--base", choices=("drtrl", "snap1"), default="drtrl")
    parser.add_argument("--iterations", type=int, default=1)
    args = parser.parse_args()
    base = eqtrace.DRTRL() if args.base == "drtrl" else eqtrace.SnAp1()

    print(
        f"Base {type(base).__name__}, {args.hidden} neurons, T = {args.length}, "
        f"{args.seeds} seeds, {args.iterations} subspace iteration(s) per step."
    )
    print(
        "| cell | rank | relative error to RTRL | cosine to RTRL | trace per sample | time × base |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, make in CELLS.items():
        problems = [
            _problem(make, args.hidden, args.length, jr.fold_in(jr.key(0), seed))
            for seed in range(args.seeds)
        ]
        model, xs, _ = problems[0]
        full = sum(a.size for a in jax.tree.leaves(model.layers[0].init_state()))
        references, rtrl_times = zip(*(_gradient(eqtrace.RTRL(), *p) for p in problems))
        ranks = sorted({0, 1, 2, 4, 8, 16, 32, full} & set(range(full + 1)))
        base_time = None
        for rank in ranks:
            rule = eqtrace.LowRankRTRL(rank, base, iterations=args.iterations)
            errors, cosines, times = [], [], []
            for problem, reference in zip(problems, references):
                g, seconds = _gradient(rule, *problem)
                times.append(seconds)
                errors.append(float(jnp.linalg.norm(g - reference) / jnp.linalg.norm(reference)))
                cosines.append(
                    float(g @ reference / (jnp.linalg.norm(g) * jnp.linalg.norm(reference)))
                )
            size = eqtrace.trace_size(rule, model, xs[0]).values
            label = f"{rank} (base)" if rank == 0 else f"{rank} (full)" if rank == full else rank
            base_time = base_time or float(np.median(times))
            print(
                f"| {name} | {label} | {np.mean(errors):.3g} ({max(errors):.3g}) | "
                f"{np.mean(cosines):.4f} ({min(cosines):.4f}) | {size:,} | "
                f"{np.median(times) / base_time:.1f} |",
                flush=True,
            )
        size = eqtrace.trace_size(eqtrace.RTRL(), model, xs[0]).values
        print(
            f"| {name} | RTRL | 0 | 1 | {size:,} | {np.median(rtrl_times) / base_time:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
