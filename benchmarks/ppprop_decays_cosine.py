"""Gradient cosine to BPTT of pp-prop with one decay and with separate input and output
decays, on the GRU benchmark line (GRU 32 → 128 + Linear 128 → 10, float32, batch 8,
T = 100, Gaussian inputs, mean squared error at each step against random targets), averaged
over three draws of the model and the data; D-RTRL for reference.

    python -m benchmarks.ppprop_decays_cosine
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import eqtrace
from eqtrace import nn


INPUT, HIDDEN, OUTPUT, BATCH, LENGTH, SEEDS = 32, 128, 10, 8, 100, 3

RULES = {
    "D-RTRL": eqtrace.DRTRL(),
    **{f"PPProp({a})": eqtrace.PPProp(a) for a in (0.5, 0.9, 0.98)},
    **{
        f"PPProp(input_decay={ax}, output_decay={af})": eqtrace.PPProp(
            input_decay=ax, output_decay=af
        )
        for ax, af in (
            (0.9, 0.5),
            (0.5, 0.9),
            (0.98, 0.5),
            (0.5, 0.98),
            (0.98, 0.9),
            (0.9, 0.98),
            (0.98, 0.0),
            (0.0, 0.98),
        )
    },
}


def _loss(y, target):
    return jnp.mean((y - target) ** 2)


def _cosines(seed):
    keys = jr.split(jr.key(seed), 4)
    model = nn.Sequential(
        [
            nn.GRUCell(INPUT, HIDDEN, dtype=jnp.float32, key=keys[0]),
            eqx.nn.Linear(HIDDEN, OUTPUT, dtype=jnp.float32, key=keys[1]),
        ]
    )
    xs = jr.normal(keys[2], (LENGTH, BATCH, INPUT), jnp.float32)
    targets = jr.normal(keys[3], (LENGTH, BATCH, OUTPUT), jnp.float32)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    state = jax.vmap(lambda _: model.init_state())(jnp.arange(BATCH))
    reference = jax.jit(lambda p: eqtrace.bptt_gradient(forward, _loss, p, state, xs, targets)[1])(
        params
    )
    result = {}
    for name, rule in RULES.items():
        state, trace = eqtrace.init_state_and_trace(model, rule, BATCH, x=xs[0, 0])
        step = jax.vmap(eqtrace.make_online_step(rule, static), in_axes=(None, 0, 0, 0))
        grads = jax.jit(
            lambda p: eqtrace.online_gradient(step, _loss, p, state, trace, xs, targets)[1]
        )(params)
        result[name] = float(eqtrace.compare_gradients(grads, reference).overall_cosine)
    return result


def main():
    runs = [_cosines(seed) for seed in range(SEEDS)]
    print("| rule | cosine to BPTT (mean of 3) | per draw |")
    print("| --- | --- | --- |")
    for name in RULES:
        values = [run[name] for run in runs]
        shown = ", ".join(f"{v:.3f}" for v in values)
        print(f"| `{name}` | {np.mean(values):.3f} | {shown} |")


if __name__ == "__main__":
    main()
