"""BPTT's gradient on the LIF benchmark line with the reset detached or differentiated, and
D-RTRL's cosine to it, against the sequence length.

    python -m benchmarks.lif_reset_gradient

The `lif` problem of `benchmarks.run` (recurrent LIF(100 → 256) with a synapse, a leaky
read-out, a loss at every step) at batch 4 and T = 100, 300, 1000. With the reset detached
(`--detach-reset`, what OTTT needs) BPTT's gradient grows with T through the recurrent
spikes; every bounded rule's cosine to it then falls towards 0.
"""

import jax
import jax.numpy as jnp

import eqtrace

from . import algorithms
from .problems import Config, build_problem


def main(lengths=(100, 300, 1000), batch=4):
    print("| reset | T | BPTT gradient norm | D-RTRL cosine to BPTT | D-RTRL norm ratio |")
    print("| --- | --- | --- | --- | --- |")
    for detach in (False, True):
        for steps in lengths:
            config = Config(model="lif", input=100, hidden=256, batch=batch, steps=steps,
                            detach_reset=detach)  # fmt: skip
            problem = build_problem(config)
            out = {
                name: jax.jit(algorithms.get(name).runner(problem))(problem.params, problem.stream)
                for name in ("bptt", "drtrl")
            }
            comparison = eqtrace.compare_gradients(out["drtrl"][1], out["bptt"][1])
            norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(out["bptt"][1])))
            print(
                f"| {'detached' if detach else 'differentiated'} | {steps} | {float(norm):.3g} | "
                f"{float(comparison.overall_cosine):.4f} | "
                f"{float(comparison.overall_norm_ratio):.3g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
