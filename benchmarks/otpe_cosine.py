"""Gradient cosine to BPTT (overall and per layer), trace size and time per sequence of OTPE
and approximate OTPE on deep feed-forward LIF networks (the paper's setting), next to D-RTRL
and OTTT on the same models (float32, one batch).

    python -m benchmarks.otpe_cosine

LIF(50 → 128) → LIF(128 → 128) → Linear(128 → 10), and the same with three LIF layers,
τ_mem = 5 (λ = exp(−1/5)); loss at each step on random targets, batch 16, T = 200. With the
reset differentiated (the paper's LIF) and detached (which OTTT needs).
"""

import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import eqtrace
from benchmarks.ottt_rflo_cosine import BATCH, HIDDEN, INPUT, LENGTH, OUTPUT, _loss
from eqtrace import nn


TAU = 5.0


def _measure(name, algorithm, model, xs, targets, depth):
    """One row: the cosine to BPTT over all parameters and per LIF layer's weights (the
    read-out's gradient, exact under every rule, dominates the overall cosine), the trace
    size, and the time of one sequence against BPTT's (best of three)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, BATCH, x=xs[0, 0])
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    online = jax.jit(
        lambda p: eqtrace.online_gradient(step, _loss, p, state, trace, xs, targets)[1]
    )
    bptt = jax.jit(lambda p: eqtrace.bptt_gradient(forward, _loss, p, state, xs, targets)[1])
    times, results = {}, {}
    for label, fn in (("online", online), ("bptt", bptt)):
        results[label] = jax.block_until_ready(fn(params))
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(fn(params))
            runs.append(time.perf_counter() - start)
        times[label] = min(runs)
    comparison = eqtrace.compare_gradients(results["online"], results["bptt"])
    layers = ", ".join(
        f"{float(comparison.cosine.layers[d].input_op.weight):.3f}" for d in range(depth)
    )
    size = eqtrace.trace_size(algorithm, model, xs[0, 0])
    print(
        f"| {name} | {float(comparison.overall_cosine):.4f} | {layers} | {size.values:,} | "
        f"{times['online'] / times['bptt']:.2f} |"
    )


def main():
    keys = iter(jr.split(jr.key(0), 20))
    xs = 2.0 * jr.normal(next(keys), (LENGTH, BATCH, INPUT), jnp.float32)
    targets = jr.normal(next(keys), (LENGTH, BATCH, OUTPUT), jnp.float32)
    lam = math.exp(-1.0 / TAU)
    print(
        "| model · rule | cosine to BPTT | per LIF layer, bottom first | trace per sample "
        "(values) | time × BPTT |"
    )
    print("| --- | --- | --- | --- | --- |")
    for depth in (2, 3):
        layer_keys = [next(keys) for _ in range(depth + 1)]
        for detach in (False, True):

            def lif(i, key):
                return nn.LIF(
                    i, HIDDEN, tau_mem=TAU, detach_reset=detach, dtype=jnp.float32, key=key
                )

            layers = [lif(INPUT if d == 0 else HIDDEN, layer_keys[d]) for d in range(depth)]
            readout = eqx.nn.Linear(HIDDEN, OUTPUT, dtype=jnp.float32, key=layer_keys[-1])
            model = nn.Sequential([*layers, readout])
            label = f"{depth} × LIF, reset {'detached' if detach else 'differentiated'}"
            rules = [
                ("OTPE", eqtrace.OTPE(leak=lam)),
                ("OTPE approx.", eqtrace.OTPE(leak=lam, approximate=True)),
                ("D-RTRL", eqtrace.DRTRL()),
            ]
            if detach:
                rules.append(("OTTT", eqtrace.OTTT()))
            for rule_name, rule in rules:
                _measure(f"{label} · {rule_name}", rule, model, xs, targets, depth)


if __name__ == "__main__":
    main()
