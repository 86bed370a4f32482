"""The sharded runs that test_sharding.py checks, in their own process: the device count of the
host platform (`XLA_FLAGS=--xla_force_host_platform_device_count=4`) must be set before JAX
starts, which would not be true in the test process.

Each case runs a driver once on arrays laid out by `eqtrace.make_shardings` over four host CPU
devices and once on a single device, in float64, and prints one JSON object per case: the
largest relative difference, the shard shape of every trace array against the layout asked for,
and the size of the largest array that a collective other than the gradient's all-reduce moves.

With `--processes 2 --process-id i --port P`, two such processes (two CPU devices each) form
one four-device mesh through `jax.distributed` on localhost.
"""

import argparse
import json
import re

import jax


jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import eqtrace  # noqa: E402


BATCH, LENGTH, INPUTS, HIDDEN = 8, 5, 6, 8
GATHERS = re.compile(r"=\s*(\(?[^=]*?)\s+(all-gather|all-to-all|collective-permute)\(")
SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def mse(y, target):
    return jnp.mean((y - target) ** 2)


def whole(a) -> np.ndarray:
    """`a` on this host, with the shards other processes hold."""
    if a.is_fully_addressable:
        return np.asarray(a)
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def relative_error(x, y) -> float:
    return max(
        float(np.max(np.abs(whole(a) - whole(b))) / max(np.max(np.abs(whole(b))), 1e-300))
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
        if np.size(b)
    )


def global_array(value, sharding):
    """A global array from a value that every process holds whole."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def largest_gather(compiled) -> int:
    """Elements of the largest result of an all-gather, all-to-all or collective-permute."""
    sizes = [0]
    for result, _ in GATHERS.findall(compiled.as_text()):
        for dims in SHAPE.findall(result):
            sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
    return max(sizes)


def make(cell_name, key):
    if cell_name == "gru":
        cell = eqtrace.nn.GRUCell(INPUTS, HIDDEN, key=key)
    else:
        cell = eqtrace.nn.LIF(INPUTS, HIDDEN, recurrent=True, synapse=True, learn_tau=True, key=key)
    layers = [cell, eqx.nn.Linear(HIDDEN, 2, key=jr.fold_in(key, 1))]
    if cell_name == "lif/leaky":  # e-prop's filter, from the leaky read-out after the cell.
        layers.insert(1, eqtrace.nn.LeakyReadout(HIDDEN, HIDDEN, key=jr.fold_in(key, 2)))
    return eqtrace.nn.Sequential(layers)


def run_case(name, mesh, model_axis, algorithm, cell_name, driver, explicit=False):
    model = make(cell_name, jr.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    if driver.startswith("block"):
        call = jax.vmap(
            eqtrace.make_online_block(algorithm, static),
            in_axes=(None, 0, 0, 1),
            out_axes=(0, 0, 1),
        )
    else:
        call = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    xs = jr.normal(jr.key(1), (LENGTH, BATCH, INPUTS))
    targets = jr.normal(jr.key(2), (LENGTH, BATCH, 2))
    optimizer = optax.adam(1e-2)
    blocks = {"block_size": 2} if driver.startswith("block") else {}

    if driver == "run_online":

        def fn(params, state, trace, xs, targets):
            del targets
            return eqtrace.run_online(call, params, state, trace, xs)

        trace_index = 2
    elif driver.endswith("gradient"):

        def fn(params, state, trace, xs, targets):
            return eqtrace.online_gradient(call, mse, params, state, trace, xs, targets, **blocks)

        trace_index = 3
    else:

        def fn(params, state, trace, xs, targets):
            opt_state = optimizer.init(params)
            return eqtrace.train_online(
                call, mse, optimizer, params, opt_state, state, trace, xs, targets, **blocks
            )

        trace_index = 3

    state, trace = eqtrace.init_state_and_trace(model, algorithm, BATCH)
    expected = jax.jit(fn)(params, state, trace, xs, targets)

    shardings = eqtrace.make_shardings(model, algorithm, mesh, model_axis=model_axis)
    with jax.set_mesh(mesh) if explicit else _nothing():
        state, trace = eqtrace.init_sharded(model, algorithm, BATCH, shardings)
        initial = [leaf.addressable_shards[0].data.shape for leaf in jtu.tree_leaves(trace)]
        args = (
            jax.device_put(params, shardings.params),
            state,
            trace,
            global_array(xs, shardings.sequences),
            global_array(targets, shardings.sequences),
        )
        compiled = jax.jit(fn).lower(*args).compile()
        out = compiled(*args)
    laid_out = [
        s.shard_shape(leaf.shape)
        for s, leaf in zip(jtu.tree_leaves(shardings.trace), jtu.tree_leaves(trace))
    ]
    returned = jtu.tree_leaves(out[trace_index])
    return {
        "name": name,
        "error": relative_error(out, expected),
        "full": [leaf.shape for leaf in jtu.tree_leaves(trace)],
        "laid_out": laid_out,
        "initial": initial,
        "returned": [leaf.addressable_shards[0].data.shape for leaf in returned],
        "devices": [len(leaf.sharding.device_set) for leaf in returned],
        "largest_gather": largest_gather(compiled),
        # D-RTRL's weight traces, `(batch, out, in, K)`: none for pp-prop.
        "smallest_weight_trace_shard": min(
            (int(np.prod(shape)) for shape in laid_out if len(shape) == 4), default=None
        ),
    }


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="*", help="the names of the cases to run (all)")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"localhost:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
        )
    auto = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Auto,))
    explicit = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Explicit,))
    grid = jax.make_mesh((2, 2), ("batch", "model"), axis_types=(AxisType.Auto,) * 2)
    drtrl, ppprop = eqtrace.DRTRL(), eqtrace.PPProp(0.6)
    windows = eqtrace.ExactWindows(drtrl)
    cases = [
        # `jax.make_mesh`'s default axes are explicit: the arrays' types carry their shardings.
        ("data/online_gradient/explicit", explicit, None, drtrl, "gru", "online_gradient", True),
        ("data/train_online/block", auto, None, drtrl, "gru", "block_train"),
        ("model/drtrl/gru", grid, "model", drtrl, "gru", "online_gradient"),
        ("model/ppprop/lif/train_online/block", grid, "model", ppprop, "lif", "block_train"),
        # Through the plan: e-prop's filtered traces, and D-RTRL's trace within windows.
        (
            "model/eprop/lif/online_gradient",
            grid,
            "model",
            eqtrace.EProp(),
            "lif/leaky",
            "gradient",
        ),
        ("model/windows/gru/train_online/block", grid, "model", windows, "gru", "block_train"),
    ]
    for case in cases:
        if not args.cases or case[0] in args.cases:
            print(json.dumps(run_case(*case)), flush=True)


if __name__ == "__main__":
    main()
