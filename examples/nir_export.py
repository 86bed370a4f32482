"""Export a spiking network trained online to NIR, and import it back.

A recurrent layer of LIF neurons with learnt per-neuron time constants and a leaky read-out is
trained with D-RTRL for a few seconds on a toy task (which of two input populations fires
faster, from 50 steps of Poisson spikes). The trained network is then exported with
`eqtrace.to_nir`, written to a `.nir` file with `nir.write` (the file simulators and
neuromorphic hardware read), read back with `nir.read`, imported with `eqtrace.from_nir`, and
run on the same test spikes as the original.

    pip install "eqtrace[nir]"
    python examples/nir_export.py
    python examples/nir_export.py --fast        # fewer updates

Expected result: the test accuracy rises from chance (about 50 %) to about 100 % in 150
updates (about 10 s on 2 CPU cores; `--fast`, 20 updates: about 80 %); the graph lists the NIR
nodes of each layer; the imported network fires the same hidden spikes as the original, and
its outputs differ from the original's by 0 (at most float32 round-off).
"""

import argparse
from collections import Counter
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import nir
import optax

import eqtrace


INPUT, HIDDEN, LENGTH = 8, 32, 50


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training updates (150)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per update (32)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (1e-2)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="where to write the file")
    parser.add_argument("--fast", action="store_true", help="a quick smoke run")
    args = parser.parse_args(argv)
    if args.fast:
        args.steps, args.batch = 20, 16
    return args


def make_batch(key, batch: int):
    """Poisson spikes, time-major `(LENGTH, batch, INPUT)`: the first or the second half of the
    inputs fires at 25 %, the other at 15 % per step; the label says which."""
    lkey, skey = jr.split(key)
    labels = jr.bernoulli(lkey, 0.5, (batch,)).astype(jnp.int32)
    first = jnp.arange(INPUT) < INPUT // 2
    rates = jnp.where(first == (labels[:, None] == 0), 0.25, 0.15)
    spikes = jr.bernoulli(skey, rates, (LENGTH, batch, INPUT))
    return spikes.astype(jnp.float32), labels


def loss_fn(y, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(y, labels))


def accuracy(model, xs, labels) -> float:
    ys = run(model, xs)[0]
    return float(jnp.mean(jnp.argmax(ys[-1], axis=-1) == labels))


@eqx.filter_jit
def run(model, xs):
    """Outputs and hidden spikes of a batch over time (`xs` time-major)."""

    def step(state, x):
        state, y = jax.vmap(model)(state, x)
        return state, (y, jax.vmap(model.layers[0].output)(state[0]))

    state = jax.vmap(lambda _: model.init_state())(jnp.arange(xs.shape[1]))
    return jax.lax.scan(step, state, xs)[1]


def main(argv=None):
    args = parse_args(argv)
    lif_key, readout_key, key = jr.split(jr.key(args.seed), 3)
    model = eqtrace.nn.Sequential(
        [
            eqtrace.nn.LIF(INPUT, HIDDEN, recurrent=True, learn_tau=True, key=lif_key),
            eqtrace.nn.LeakyReadout(HIDDEN, 2, tau=10.0, key=readout_key),
        ]
    )
    algorithm = eqtrace.DRTRL()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(params)

    @eqx.filter_jit
    def update(params, opt_state, xs, labels):
        state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=xs.shape[1])
        loss, grads, _, _ = eqtrace.online_gradient(
            step, loss_fn, params, state, trace, xs, labels, sequence_targets=True
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss / xs.shape[0]

    key, test_key = jr.split(key)
    test_xs, test_labels = make_batch(test_key, 256)
    print(f"D-RTRL, {args.steps} updates of batch {args.batch}")
    print(f"  test accuracy before training: {accuracy(model, test_xs, test_labels):.1%}")
    for _ in range(args.steps):
        key, batch_key = jr.split(key)
        params, opt_state, loss = update(params, opt_state, *make_batch(batch_key, args.batch))
    model = eqx.combine(params, static)
    print(f"  test accuracy after training:  {accuracy(model, test_xs, test_labels):.1%}")

    graph = eqtrace.to_nir(model)
    kinds = Counter(type(node).__name__ for node in graph.nodes.values())
    print(f"\nNIR graph: {dict(sorted(kinds.items()))}")
    for name in graph.nodes:
        print(f"  {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "nir_export.nir"
    nir.write(path, graph)
    print(f"written to {path} ({path.stat().st_size:,} bytes)")

    imported = eqtrace.from_nir(nir.read(path), dt=model.layers[0].dt, dtype=jnp.float32)
    (y, spikes), (y_back, spikes_back) = run(model, test_xs), run(imported, test_xs)
    print("\nImported from the file and run on the same test spikes:")
    print(f"  hidden spikes identical: {bool(jnp.array_equal(spikes, spikes_back))}")
    print(f"  max output difference: {float(jnp.max(jnp.abs(y - y_back))):.1e}")
    print(f"  test accuracy: {accuracy(imported, test_xs, test_labels):.1%}")


if __name__ == "__main__":
    main()
