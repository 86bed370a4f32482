"""Gradient cosine to BPTT, trace size and time per sequence of OTPE on deep feed-forward LIF
networks (the paper's setting), next to D-RTRL and OTTT on the same models (float32, one
batch).

    python -m benchmarks.otpe_cosine

LIF(50 → 128) → LIF(128 → 128) → Linear(128 → 10), and the same with three LIF layers,
τ_mem = 5 (λ = exp(−1/5)); loss at each step on random targets, batch 16, T = 200. With the
reset differentiated (the paper's LIF) and detached (which OTTT needs).
"""

import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr

import eqtrace
from benchmarks.ottt_rflo_cosine import BATCH, HIDDEN, INPUT, LENGTH, OUTPUT, _measure
from eqtrace import nn


TAU = 5.0


def main():
    keys = iter(jr.split(jr.key(0), 20))
    xs = 2.0 * jr.normal(next(keys), (LENGTH, BATCH, INPUT), jnp.float32)
    targets = jr.normal(next(keys), (LENGTH, BATCH, OUTPUT), jnp.float32)
    lam = math.exp(-1.0 / TAU)
    print("| model · rule | cosine to BPTT | trace per sample (values) | time × BPTT |")
    print("| --- | --- | --- | --- |")
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
            rules = [("OTPE", eqtrace.OTPE(leak=lam)), ("D-RTRL", eqtrace.DRTRL())]
            if detach:
                rules.append(("OTTT", eqtrace.OTTT()))
            for rule_name, rule in rules:
                _measure(f"{label} · {rule_name}", rule, model, xs, targets)


if __name__ == "__main__":
    main()
