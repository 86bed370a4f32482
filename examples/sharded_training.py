"""Sharded online learning: data- and model-parallel traces on a mesh, on one or several hosts.

A GRU trained with D-RTRL, whose weight-shaped trace is what grows (`3·H·(I + H)` values per
sample), laid out by `eqtrace.make_shardings` over a device mesh:

- data parallel, mesh `(batch,)`: the batch axis of state, trace and inputs is split, the
  parameters are replicated; XLA all-reduces the gradient;
- model parallel, mesh `(batch, model)`: in addition, every synaptic op's weights and their
  traces are split along the op's output (neuron) axis, so each device holds `1/model` of the
  trace.

For each layout it prints the trace bytes per device (read from the arrays' shards), XLA's
memory analysis of the compiled gradient, and the gradient's largest difference from the
single-device one; then it trains on the last layout with `eqtrace.train_online`.

    python examples/sharded_training.py --devices 4            # 4 host CPU devices
    python examples/sharded_training.py --devices 4 --fast     # a quick smoke run

Several processes (hosts) run the same script, one per process, each with its local devices:

    python examples/sharded_training.py --devices 2 --processes 2 --process-id 0 &
    python examples/sharded_training.py --devices 2 --processes 2 --process-id 1

Expected result: trace bytes per device halve with each doubling of the model axis, every
gradient difference is at float32 round-off (≲1e-6), and the loss falls.
"""

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=None, help="host CPU devices to force")
    parser.add_argument("--processes", type=int, default=1, help="number of processes (1)")
    parser.add_argument("--process-id", type=int, default=0, help="this process's rank (0)")
    parser.add_argument(
        "--coordinator", default="localhost:12355", help="address of process 0 (host:port)"
    )
    parser.add_argument("--hidden", type=int, default=256, help="GRU neurons (256)")
    parser.add_argument("--inputs", type=int, default=32, help="input features (32)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per update (8)")
    parser.add_argument("--length", type=int, default=20, help="sequence length (20)")
    parser.add_argument("--steps", type=int, default=20, help="training sequences (20)")
    parser.add_argument("--fast", action="store_true", help="a quick smoke run")
    args = parser.parse_args(argv)
    if args.fast:
        args.hidden, args.inputs, args.batch, args.length, args.steps = 16, 8, 4, 6, 2
    return args


ARGS = parse_args()
if ARGS.devices is not None:
    # Both must be set before JAX starts.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    )

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import eqtrace  # noqa: E402


if ARGS.processes > 1:
    # CPU devices of different processes talk through gloo (GPUs and TPUs need nothing).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=ARGS.coordinator,
        num_processes=ARGS.processes,
        process_id=ARGS.process_id,
    )


def say(*text):
    if jax.process_index() == 0:
        print(*text, flush=True)


def recall(xs):
    """The task: output the first input feature of the previous step."""
    return jnp.concatenate([jnp.zeros_like(xs[:1, :, :1]), xs[:-1, :, :1]])


def mse(y, target):
    return jnp.mean((y - target) ** 2)


def global_array(value, sharding):
    """A global array from a value every process holds whole (real multi-host input
    pipelines give each process its own rows: `jax.make_array_from_process_local_data`)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def trace_bytes_per_device(trace) -> int:
    """Bytes of the trace on the first device, read from the arrays' shards."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jtu.tree_leaves(trace))


def fetch(tree):
    """Every leaf whole on this host (with the shards that other processes hold)."""

    def whole(a):
        if a.is_fully_addressable:
            return np.asarray(a)
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jtu.tree_map(whole, tree)


def main(args):
    devices = jax.device_count()
    key_model, key_data = jr.split(jr.key(0))
    model = eqtrace.nn.Sequential(
        [
            eqtrace.nn.GRUCell(args.inputs, args.hidden, key=key_model),
            eqx.nn.Linear(args.hidden, 1, key=jr.fold_in(key_model, 1)),
        ]
    )
    algorithm = eqtrace.DRTRL()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    online_step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    xs = jr.normal(key_data, (args.length, args.batch, args.inputs))
    targets = recall(xs)

    def gradient(params, state, trace, xs, targets):
        return eqtrace.online_gradient(
            online_step, mse, params, state, trace, xs, targets, reduction="mean"
        )

    say(
        f"{jax.process_count()} process(es), {devices} devices; GRU {args.inputs}->"
        f"{args.hidden}, batch {args.batch}: D-RTRL trace "
        f"{eqtrace.trace_size(algorithm, model).bytes * args.batch / 2**20:.2f} MiB"
    )
    layouts = [(1, 1), (1, 2), (1, 4), (devices, 1), (devices // 2, 2)]
    layouts = [
        (b, m) for b, m in dict.fromkeys(layouts) if b * m <= devices and args.batch % b == 0
    ]
    if args.fast:
        layouts = [layouts[0], layouts[-1]]
    if jax.process_count() > 1:  # A mesh spans every process.
        layouts = [(b, m) for b, m in layouts if b * m == devices]
    # The reference: one device of this process, no sharding.
    reference = fetch(
        jax.jit(gradient)(
            params, *eqtrace.init_state_and_trace(model, algorithm, args.batch), xs, targets
        )[1]
    )
    say(f"{'mesh (batch, model)':>20} {'trace/device':>13} {'arguments':>10} {'temp':>10} diff")
    for batch, width in layouts:
        mesh = jax.make_mesh(
            (batch, width),
            ("batch", "model"),
            axis_types=(AxisType.Auto,) * 2,
            devices=jax.devices()[: batch * width],
        )
        shardings = eqtrace.make_shardings(model, algorithm, mesh, model_axis="model")
        state, trace = eqtrace.init_sharded(model, algorithm, args.batch, shardings)
        arguments = (
            jax.device_put(params, shardings.params),
            state,
            trace,
            global_array(xs, shardings.sequences),
            global_array(targets, shardings.sequences),
        )
        compiled = jax.jit(gradient).lower(*arguments).compile()
        memory = compiled.memory_analysis()
        _, grads, _, trace = compiled(*arguments)
        grads = fetch(grads)
        difference = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jtu.tree_leaves(grads), jtu.tree_leaves(reference))
        )
        say(
            f"{str((batch, width)):>20} {trace_bytes_per_device(trace) / 2**20:10.3f} MiB "
            f"{memory.argument_size_in_bytes / 2**20:6.2f} MiB "
            f"{memory.temp_size_in_bytes / 2**20:6.2f} MiB {difference:.1e}"
        )

    optimizer = optax.adam(1e-3)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(optimizer.init)(params)  # Laid out like the parameters by XLA.
    state, trace = eqtrace.init_sharded(model, algorithm, args.batch, shardings)
    train = eqx.filter_jit(eqtrace.train_online)
    losses = []
    for step in range(args.steps):
        xs = jr.normal(jr.fold_in(key_data, step), (args.length, args.batch, args.inputs))
        targets = recall(xs)
        params, opt_state, state, trace, loss = train(
            online_step,
            mse,
            optimizer,
            params,
            opt_state,
            state,
            trace,
            global_array(xs, shardings.sequences),
            global_array(targets, shardings.sequences),
        )
        losses.append(float(np.mean(fetch(loss))))
    say(
        f"train_online on mesh {tuple(mesh.shape.values())}: loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}"
    )
    specs = sorted({str(leaf.sharding.spec) for leaf in jtu.tree_leaves(trace)})
    say(f"trace shardings kept: {specs}")


if __name__ == "__main__":
    main(ARGS)
    sys.exit(0)
