"""Misuse raises a clear error at trace time, naming the argument, what was expected, what was
received and the fix.

`docs/errors.md` lists every error in tables `| Misuse | Error | Fix |`. Each row's misuse
starts with a bold title, the key of its triggers in `CASES` below; its error cell holds the
exception type and the message's key phrases (`…` stands for the parts that vary). The tests
trigger every case and check both against the message actually raised, so the page cannot
drift from the code.
"""

import atexit
import gc
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

import eqtrace
from eqtrace import nn
from eqtrace._validation import example_input
from helpers import LONG, LeakyTanh, Rolling, cast, mse, pairs, squared_loss
from registry import ALGORITHMS, EVERY_CELL, make_cell
from test_any_cell import (
    CalledOutOfOrder,
    OutputNotOfState,
    RawWeightUse,
    VmappedOp,
    WeightNormed,
)
from test_eprop import RolledOutput
from test_snapn import Untraceable


ERRORS_PAGE = Path(__file__).parent.parent / "docs" / "errors.md"
LENGTH, BATCH, INPUT, HIDDEN = 6, 2, 3, 4


def _key(i: int = 0):
    return jr.key(i)


def _gru(hidden: int = HIDDEN):
    return nn.GRUCell(INPUT, hidden, key=_key())


def _setup(algorithm=None, model=None, batch_size=None):
    """A GRU, its partition, an online step and block, and a state and trace (for one sample,
    or a batch of `batch_size`)."""
    algorithm = eqtrace.RTRL() if algorithm is None else algorithm
    model = _gru() if model is None else model
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=batch_size)
    step = eqtrace.make_online_step(algorithm, static)
    block = eqtrace.make_online_block(algorithm, static)
    return model, params, static, step, block, state, trace


def _sequence(batch: tuple[int, ...] = ()):
    xs = jr.normal(_key(1), (LENGTH, *batch, INPUT))
    targets = jr.normal(_key(2), (LENGTH, *batch, HIDDEN))
    return xs, targets


def _elementwise_loss(y, target):
    return (y - target) ** 2  # not reduced: one loss per output element


def _per_sequence_targets() -> list[Callable[[], object]]:
    """Every driver given `(B, n_out)` targets, one per sequence, as braintrace's tutorial does."""
    _, params, static, step, _, state, trace = _setup(batch_size=BATCH)
    batched = jax.vmap(step, in_axes=(None, 0, 0, 0))
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    xs, _ = _sequence((BATCH,))
    targets = jnp.zeros((BATCH, HIDDEN))
    sgd = optax.sgd(0.1)
    return [
        lambda: eqtrace.online_gradient(batched, mse, params, state, trace, xs, targets),
        lambda: eqtrace.train_online(
            batched, mse, sgd, params, sgd.init(params), state, trace, xs, targets
        ),
        lambda: eqtrace.bptt_gradient(forward, mse, params, state, xs, targets),
        lambda: eqtrace.truncated_bptt_gradient(forward, mse, params, state, xs, targets, 2),
    ]


def _step_weights_of_wrong_shape():
    _, params, static, step, block, state, trace = _setup()
    xs, targets = _sequence()
    forward = eqtrace.make_forward_step(static)
    sgd = optax.sgd(0.1)
    per_sample = jnp.ones((BATCH,))
    return [
        lambda: eqtrace.online_gradient(
            step, squared_loss, params, state, trace, xs, targets, step_weights=per_sample
        ),
        lambda: eqtrace.online_gradient(
            block,
            squared_loss,
            params,
            state,
            trace,
            xs,
            targets,
            block_size=2,
            step_weights=jnp.ones((len(xs), BATCH)),
        ),
        lambda: eqtrace.train_online(
            step,
            squared_loss,
            sgd,
            params,
            sgd.init(params),
            state,
            trace,
            xs,
            targets,
            step_weights=per_sample,
        ),
        lambda: eqtrace.bptt_gradient(
            forward, squared_loss, params, state, xs, targets, step_weights=per_sample
        ),
    ]


def _unknown_reduction():
    _, params, static, step, _, state, trace = _setup()
    xs, targets = _sequence()
    forward = eqtrace.make_forward_step(static)
    return [
        lambda: eqtrace.online_gradient(
            step, squared_loss, params, state, trace, xs, targets, reduction="average"
        ),
        lambda: eqtrace.truncated_bptt_gradient(
            forward, squared_loss, params, state, xs, targets, 2, reduction="Mean"
        ),
    ]


def _inputs_of_different_lengths():
    _, params, static, _, _, state, _ = _setup()
    xs, targets = _sequence()
    forward = eqtrace.make_forward_step(static)
    # A pytree input (e.g. two input streams), one of its leaves a step short.
    return [
        lambda: eqtrace.bptt_gradient(forward, squared_loss, params, state, (xs, xs[1:]), targets)
    ]


def _loss_not_scalar():
    _, params, static, step, block, state, trace = _setup()
    xs, targets = _sequence()
    forward = eqtrace.make_forward_step(static)
    sgd = optax.sgd(0.1)
    return [
        lambda: eqtrace.online_gradient(step, _elementwise_loss, params, state, trace, xs, targets),
        lambda: eqtrace.online_gradient(
            block, _elementwise_loss, params, state, trace, xs, targets, block_size=2
        ),
        lambda: eqtrace.train_online(
            block,
            _elementwise_loss,
            sgd,
            params,
            sgd.init(params),
            state,
            trace,
            xs,
            targets,
            block_size=2,
        ),  # fmt: skip
        lambda: eqtrace.bptt_gradient(forward, _elementwise_loss, params, state, xs, targets),
    ]


def _params_of_another_model():
    _, _, static, step, block, state, trace = _setup()
    other = nn.LSTMCell(INPUT, HIDDEN, key=_key())
    wider = _gru(HIDDEN + 1)
    xs, _ = _sequence()
    forward = eqtrace.make_forward_step(static)
    return [
        lambda: step(eqx.partition(other, eqx.is_inexact_array)[0], state, trace, xs[0]),
        lambda: block(eqx.partition(wider, eqx.is_inexact_array)[0], state, trace, xs),
        lambda: forward(eqx.partition(other, eqx.is_inexact_array)[0], state, xs[0]),
    ]


def _step_given_block_size():
    _, params, _, step, _, state, trace = _setup()
    xs, targets = _sequence()
    sgd = optax.sgd(0.1)
    return [
        lambda: eqtrace.online_gradient(
            step, squared_loss, params, state, trace, xs, targets, block_size=2
        ),
        lambda: eqtrace.train_online(
            step,
            squared_loss,
            sgd,
            params,
            sgd.init(params),
            state,
            trace,
            xs,
            targets,
            block_size=2,
        ),  # fmt: skip
        lambda: eqtrace.run_online(step, params, state, trace, xs, block_size=2),
    ]


def _block_without_block_size():
    _, params, _, _, block, state, trace = _setup(batch_size=BATCH)
    xs, targets = _sequence((BATCH,))
    # Still recognised once vmapped, by `jax.vmap` or `eqx.filter_vmap`.
    batched = jax.vmap(block, in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1))
    filter_batched = eqx.filter_vmap(block, in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1))
    sgd = optax.sgd(0.1)
    return [
        lambda: eqtrace.online_gradient(batched, mse, params, state, trace, xs, targets),
        lambda: eqtrace.train_online(
            filter_batched, mse, sgd, params, sgd.init(params), state, trace, xs, targets
        ),
        lambda: eqtrace.run_online(batched, params, state, trace, xs),
    ]


def _count_of_wrong_type():
    _, params, static, _, block, state, trace = _setup()
    xs, targets = _sequence()
    forward = eqtrace.make_forward_step(static)
    return [
        lambda: eqtrace.online_gradient(
            block, squared_loss, params, state, trace, xs, targets, block_size=True
        ),
        lambda: eqtrace.truncated_bptt_gradient(
            forward, squared_loss, params, state, xs, targets, True
        ),
    ]


def _mean_over_no_steps():
    _, params, static, step, block, state, trace = _setup()
    xs, targets = jnp.zeros((0, INPUT)), jnp.zeros((0, HIDDEN))
    forward = eqtrace.make_forward_step(static)
    return [
        lambda: eqtrace.online_gradient(
            step, squared_loss, params, state, trace, xs, targets, reduction="mean"
        ),
        lambda: eqtrace.online_gradient(
            block, squared_loss, params, state, trace, xs, targets, block_size=2, reduction="mean"
        ),
        lambda: eqtrace.bptt_gradient(
            forward, squared_loss, params, state, xs, targets, reduction="mean"
        ),
        lambda: eqtrace.truncated_bptt_gradient(
            forward, squared_loss, params, state, xs, targets, 2, reduction="mean"
        ),
    ]


def _sequence_targets_with_a_time_axis():
    _, params, static, step, _, state, trace = _setup(batch_size=BATCH)
    batched = jax.vmap(step, in_axes=(None, 0, 0, 0))
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    xs, targets = _sequence((BATCH,))  # targets of shape (T, B, n_out): one per step
    sgd = optax.sgd(0.1)
    return [
        lambda: eqtrace.online_gradient(
            batched, mse, params, state, trace, xs, targets, sequence_targets=True
        ),
        lambda: eqtrace.train_online(
            batched,
            mse,
            sgd,
            params,
            sgd.init(params),
            state,
            trace,
            xs,
            targets,
            sequence_targets=True,
        ),  # fmt: skip
        lambda: eqtrace.bptt_gradient(
            forward, mse, params, state, xs, targets, sequence_targets=True
        ),
    ]


def _count_below_one():
    _, params, static, _, block, state, trace = _setup()
    xs, targets = _sequence()
    forward = eqtrace.make_forward_step(static)
    sgd = optax.sgd(0.1)
    return [
        lambda: eqtrace.online_gradient(
            block, squared_loss, params, state, trace, xs, targets, block_size=0
        ),
        lambda: eqtrace.train_online(
            block,
            squared_loss,
            sgd,
            params,
            sgd.init(params),
            state,
            trace,
            xs,
            targets,
            block_size=-1,
        ),  # fmt: skip
        lambda: eqtrace.truncated_bptt_gradient(
            forward, squared_loss, params, state, xs, targets, 0
        ),
    ]


def _complex_input():
    model, params, _, step, block, state, trace = _setup(eqtrace.DRTRL())
    xs, targets = _sequence()
    complex_xs = xs * (1 + 1j)
    text = np.array(["a", "b", "c"])
    return [
        lambda: step(params, state, trace, complex_xs[0]),
        lambda: block(params, state, trace, complex_xs),
        lambda: eqtrace.online_gradient(
            step, squared_loss, params, state, trace, complex_xs, targets
        ),
        lambda: eqtrace.RTRL().step(model, state, eqtrace.RTRL().init_trace(model, state), text),
    ]


def _input_of_wrong_shape():
    model, _, _, _, _, state, trace = _setup()
    wrong_size = jnp.zeros(INPUT + 1)  # an example input the model's layers cannot take
    network = nn.Sequential([_gru(), eqx.nn.Linear(HIDDEN, 2, key=_key())])
    return [
        lambda: eqtrace.RTRL().step(model, state, trace, jnp.ones((BATCH, INPUT))),
        # Example inputs were used without a check (a dot_general error from inside the model).
        _init(eqtrace.RTRL(), model, wrong_size),
        _init(eqtrace.DRTRL(), network, wrong_size),
        lambda: eqtrace.init_state_and_trace(network, eqtrace.PPProp(0.5), x=wrong_size),
        lambda: eqtrace.check(network, eqtrace.DRTRL(), wrong_size),
    ]


def _state_of_wrong_shape():
    model, _, _, _, _, _, trace = _setup()
    batched_state = jnp.zeros((BATCH, HIDDEN))
    return [lambda: eqtrace.RTRL().step(model, batched_state, trace, jnp.ones(INPUT))]


class Float32State(eqtrace.AbstractCell):
    """A cell whose `init_state` fixes float32 while its weight is float64 (under this suite's
    x64): its step promotes the state to float64."""

    op: nn.Linear

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, HIDDEN, key=key)

    def init_state(self):
        return jnp.zeros(HIDDEN, jnp.float32)

    def __call__(self, state, x):
        state = 0.5 * state + self.op(x)
        return state, state

    def output(self, state):
        return state


class WrappedEquinoxCell(eqtrace.AbstractCell):
    """A cell that holds an Equinox recurrent cell, whose matmuls are raw array products."""

    layer: eqx.Module
    input_size: int = eqx.field(static=True)

    def __init__(self, kind, hidden, *, key):
        self.input_size = INPUT
        self.layer = getattr(eqx.nn, kind)(INPUT, hidden, key=key)

    def init_state(self):
        return jnp.zeros(self.layer.hidden_size)

    def __call__(self, state, x):
        if isinstance(self.layer, eqx.nn.LSTMCell):
            state = self.layer(x, (state, state))[0]
        else:
            state = self.layer(x, state)
        return state, state

    def output(self, state):
        return state


class LearnedInitialState(eqtrace.AbstractCell):
    """A cell whose `h0` is read only in `init_state`: no driver can learn it."""

    op: nn.Linear
    h0: jax.Array
    input_size: int = eqx.field(static=True)

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, HIDDEN, key=key)
        self.h0 = jnp.ones(HIDDEN)
        self.input_size = INPUT

    def init_state(self):
        return self.h0

    def __call__(self, state, x):
        state = 0.5 * state + self.op(x)
        return state, state

    def output(self, state):
        return state


def _parameter_outside_the_step():
    model = LearnedInitialState(key=_key())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, x = model.init_state(), jnp.ones(INPUT)
    cases = [lambda: eqtrace.make_forward_step(static)(params, state, x)]
    for algorithm in (eqtrace.RTRL(), eqtrace.DRTRL(), eqtrace.UORO(key=_key())):
        trace = algorithm.init_trace(model, state)
        step = eqtrace.make_online_step(algorithm, static)
        cases.append(lambda f=step, t=trace: jax.jit(f)(params, state, t, x))
    return cases


def _step_changes_state_dtype():
    model = Float32State(key=_key())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = model.init_state()
    xs, targets = jnp.ones((LENGTH, INPUT)), jnp.zeros((LENGTH, HIDDEN))
    cases = [
        lambda: eqtrace.bptt_gradient(
            eqtrace.make_forward_step(static), mse, params, state, xs, targets
        )
    ]
    for algorithm in (eqtrace.RTRL(), eqtrace.DRTRL()):
        trace = algorithm.init_trace(model, state, xs[0])
        cases.append(lambda a=algorithm, t=trace: a.step(model, state, t, xs[0]))
        cases.append(
            lambda a=algorithm, t=trace: eqtrace.online_gradient(
                eqtrace.make_online_step(a, static), mse, params, state, t, xs, targets
            )
        )
    # Float64 data into a float32 model (the message names the input as the cause).
    cell = eqtrace.nn.RNNCell(INPUT, HIDDEN, dtype=jnp.float32, key=_key())
    rule = eqtrace.DRTRL()
    trace = rule.init_trace(cell, cell.init_state(), xs[0].astype(jnp.float32))
    cases.append(lambda: rule.step(cell, cell.init_state(), trace, xs[0]))
    return cases


def _example_input_the_cell_cannot_take():
    """A cell that declares no input size, given an example input of another size: its matmul
    failed inside JAX."""
    from test_any_cell import RawWeightUse

    cell = RawWeightUse(key=_key())
    return [
        lambda: eqtrace.check(cell, eqtrace.DRTRL(), jnp.zeros(3)),
        _init(eqtrace.PPProp(0.5), cell, jnp.zeros(3)),
    ]


def _example_input_with_an_extra_axis():
    """Cells that declare no input size, given `(n, 1)`: the example input broadcast against
    the state (JAX's default rank promotion, which this suite turns off), and failed inside
    the next layer or inside the diagonal rules' analysis."""
    x = jnp.zeros((INPUT, 1))
    network = nn.Sequential(
        [LeakyTanh(INPUT, HIDDEN, key=_key()), eqx.nn.Linear(HIDDEN, 2, key=_key())]
    )

    def promoting(call):
        def run():
            with jax.numpy_rank_promotion("allow"):
                call()

        return run

    return [
        promoting(_init(eqtrace.DRTRL(), network, x)),
        promoting(
            lambda: eqtrace.check(LeakyTanh(INPUT, HIDDEN, key=_key()), eqtrace.PPProp(0.5), x)
        ),
    ]


def _trace_of_another_algorithm():
    model, _, _, _, _, state, _ = _setup()
    drtrl_trace = eqtrace.DRTRL().init_trace(model, state)
    return [lambda: eqtrace.RTRL().step(model, state, drtrl_trace, jnp.ones(INPUT))]


def _traced_mask():
    # `eqx.filter_jit` traces the mask of a masked LIF: SnAp-n's pattern, read in the step
    # without a plan, is denser than the one `init_trace` read outside `jit`.
    mask = jnp.asarray(np.random.default_rng(0).random((HIDDEN, HIDDEN)) < 0.5)
    model = nn.LIF(INPUT, HIDDEN, recurrent=True, recurrent_mask=mask, key=_key())
    rule, state, x = eqtrace.SnAp(2), model.init_state(), jnp.ones(INPUT)
    trace = rule.init_trace(model, state, x)
    return [lambda: eqx.filter_jit(rule.step)(model, state, trace, x)]


class RawWeight(eqtrace.AbstractCell):
    """A recurrent weight held as a raw array (too large for a dense trace), outside any op."""

    op: nn.Linear
    weight: jax.Array

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, 9, key=key)
        self.weight = jnp.eye(9) / 2

    def init_state(self):
        return jnp.zeros(9)

    def __call__(self, state, x):
        h = jnp.tanh(self.weight @ state + self.op(x))
        return h, h


class GlobalLeaf(eqtrace.AbstractCell):
    """A state with a per-neuron leaf and a scalar (global) leaf."""

    op: nn.Linear

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, HIDDEN, key=key)

    def init_state(self):
        return jnp.zeros(HIDDEN), jnp.zeros(())

    def __call__(self, state, x):
        h, g = state
        h = jnp.tanh(self.op(x) + g)
        return (h, 0.9 * g), h

    def output(self, state):
        return state[0]


class NormalisedInput(eqtrace.AbstractCell):
    """A recurrent op on the normalised state: each input element depends on every neuron."""

    op: nn.Linear

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT + HIDDEN, HIDDEN, key=key)

    def init_state(self):
        return jnp.zeros(HIDDEN)

    def __call__(self, state, x):
        h = jnp.tanh(self.op(jnp.concatenate([x, state / jnp.linalg.norm(state + 1)])))
        return h, h


class RefractoryCount(eqtrace.AbstractCell):
    """A per-neuron integer refractory count beside the membrane."""

    op: nn.Linear

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, HIDDEN, key=key)

    def init_state(self):
        return jnp.zeros(HIDDEN), jnp.zeros(HIDDEN, jnp.int32)

    def __call__(self, state, x):
        v, count = state
        v = jnp.where(count == 0, 0.9 * v + self.op(x), 0.9 * v)
        new_state = (v, jnp.where(v > 1, 2, jnp.maximum(count - 1, 0)))
        return new_state, v

    def output(self, state):
        return state[0]


class ComplexState(eqtrace.AbstractCell):
    """A complex state, as an LRU written naively."""

    op: nn.Linear

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, HIDDEN, key=key)

    def init_state(self):
        return jnp.zeros(HIDDEN, jnp.complex128)

    def __call__(self, state, x):
        h = (0.5 + 0.5j) * state + self.op(x)
        return h, h


@jax.custom_vjp
def _vjp_step(v):
    return (v > 0).astype(v.dtype)


_vjp_step.defvjp(lambda v: (_vjp_step(v), v), lambda v, g: (g / (1 + jnp.abs(v)),))


class VJPSurrogate(eqtrace.AbstractCell):
    """Spikes through a `jax.custom_vjp` function, fed back into the membrane."""

    op: nn.Linear

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, HIDDEN, key=key)

    def init_state(self):
        return jnp.zeros(HIDDEN)

    def __call__(self, state, x):
        v = 0.9 * state + self.op(x) - _vjp_step(state - 0.5)
        return v, v


def _init(algorithm, cell, x=jnp.zeros(INPUT)):
    return lambda: algorithm.init_trace(cell, cell.init_state(), x)


def _every_cell(**sizes):
    """Every built-in cell (and `Linear`) with the given sizes, the others valid."""
    input_size, hidden_size = sizes.get("input_size", INPUT), sizes.get("hidden_size", HIDDEN)
    return [
        lambda: nn.RNNCell(input_size, hidden_size, key=_key()),
        lambda: nn.GRUCell(input_size, hidden_size, key=_key()),
        lambda: nn.LSTMCell(input_size, hidden_size, key=_key()),
        lambda: nn.MinGRUCell(input_size, hidden_size, key=_key()),
        lambda: nn.LRUCell(input_size, hidden_size, key=_key()),
        lambda: nn.LIF(input_size, hidden_size, key=_key()),
        lambda: nn.ALIF(input_size, hidden_size, key=_key()),
        lambda: nn.LeakyReadout(input_size, hidden_size, key=_key()),
        lambda: nn.Linear(input_size, hidden_size, key=_key()),
    ]


def _directory() -> str:
    directory = tempfile.mkdtemp(prefix="eqtrace-test-errors-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _checkpoint():
    """A pp-prop (rank 8) LIF learner saved at step 3: its directory, tree and model."""
    model, algorithm = nn.LIF(INPUT, HIDDEN, key=_key()), eqtrace.PPProp(rank=8)
    params = eqx.filter(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm)
    tree = {"params": params, "state": state, "trace": trace}
    directory = _directory()
    eqtrace.save_checkpoint(directory, 3, tree, algorithm=algorithm, model=model)
    return directory, tree, model


def _restore(algorithm=None, model=None, like=None, directory=None, step=None):
    saved, tree, saved_model = _checkpoint()
    return lambda: eqtrace.restore_checkpoint(
        saved if directory is None else directory,
        tree if like is None else like(tree),
        algorithm=eqtrace.PPProp(rank=8) if algorithm is None else algorithm,
        model=saved_model if model is None else model,
        step=step,
    )


def _saved_twice():
    directory, tree, model = _checkpoint()
    return lambda: eqtrace.save_checkpoint(
        directory, 3, tree, algorithm=eqtrace.PPProp(rank=8), model=model
    )


def _damaged(do: Callable[[Path], object]) -> Callable[[], object]:
    """Restoring step 3 after `do(step folder)`."""
    directory, tree, model = _checkpoint()
    do(Path(directory) / "3")
    return lambda: eqtrace.restore_checkpoint(
        directory, tree, algorithm=eqtrace.PPProp(rank=8), model=model, step=3
    )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bit_flipped():
    """Restoring a checkpoint with a bit flipped in its array data (TensorStore reads it back
    without a word: the digest saved with the arrays notices)."""
    directory, algorithm, model = _directory(), eqtrace.DRTRL(), nn.LIF(INPUT, HIDDEN, key=_key())
    tree = {"x": jr.normal(_key(), (50_000,), jnp.float32)}
    eqtrace.save_checkpoint(directory, 1, tree, algorithm=algorithm, model=model)
    path = max(
        (p for p in (Path(directory) / "1" / "arrays").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return lambda: eqtrace.restore_checkpoint(
        directory, tree, algorithm=algorithm, model=model, step=1
    )


def _all_damaged():
    directory, tree, model = _checkpoint()
    shutil.rmtree(Path(directory) / "3" / "arrays")
    return lambda: eqtrace.restore_checkpoint(
        directory, tree, algorithm=eqtrace.PPProp(rank=8), model=model
    )


def _folder_in_the_way():
    directory, tree, model = _checkpoint()
    (Path(directory) / "4").mkdir()
    return lambda: eqtrace.save_checkpoint(
        directory, 4, tree, algorithm=eqtrace.PPProp(rank=8), model=model
    )


def _below_the_latest():
    directory, tree, model = _checkpoint()
    return lambda: eqtrace.save_checkpoint(
        directory, 2, tree, algorithm=eqtrace.PPProp(rank=8), model=model
    )


#: Another process holding a directory's writer lock as `save_checkpoint` takes it, until
#: its stdin closes (without importing eqtrace: it starts in milliseconds).
_LOCK_HOLDER = """
import fcntl, os, sys
descriptor = os.open(os.path.join(sys.argv[1], ".eqtrace-writer.lock"), os.O_RDWR | os.O_CREAT)
fcntl.lockf(descriptor, fcntl.LOCK_EX)
os.write(descriptor, f"pid {os.getpid()} on host here".encode())
print("locked", flush=True)
sys.stdin.read()
"""


def _second_writer():
    directory = _directory()
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, directory],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"

    def save():
        try:
            eqtrace.save_checkpoint(
                directory, 1, {}, algorithm=eqtrace.DRTRL(), model=nn.LIF(INPUT, HIDDEN, key=_key())
            )
        finally:
            holder.communicate()

    return save


def _a_file() -> str:
    path = Path(_directory()) / "run.ckpt"
    path.write_text("")
    return str(path)


def _batched(tree):
    return jax.tree.map(lambda a: jnp.stack([a, a]), tree)


def _mesh(names: tuple[str, ...]) -> Mesh:
    """A mesh of this process's one device (the tests run on one)."""
    return Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(names)), names)


def _uneven_batch():
    # Four devices on the batch axis, only described: nothing is created before the check.
    shardings = eqtrace.Shardings(
        params=None,
        state=None,
        trace=None,
        sequences=NamedSharding(AbstractMesh((4,), ("batch",)), PartitionSpec(None, "batch")),
    )
    eqtrace.init_sharded(_gru(), eqtrace.DRTRL(), 6, shardings)


class SharedThreshold(eqtrace.AbstractCell):
    """A learnable threshold read in the reset and in the spike (`output`)."""

    op: nn.Linear
    threshold: jax.Array

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, HIDDEN, key=key)
        self.threshold = jnp.ones(HIDDEN)

    def init_state(self):
        return jnp.zeros(HIDDEN)

    def __call__(self, v, x):
        v = 0.9 * v + self.op(x) - self.threshold * jax.lax.stop_gradient(self.output(v))
        return v, self.output(v)

    def output(self, v):
        return nn.surrogate.triangle(v - self.threshold)


class SpectralCell(eqtrace.AbstractCell):
    """A state filtered in the frequency domain (`jnp.fft`, a primitive the analysis has no
    rule for)."""

    op: nn.Linear

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, HIDDEN, key=key)

    def init_state(self):
        return jnp.zeros(HIDDEN)

    def __call__(self, h, x):
        h = jnp.real(jnp.fft.ifft(0.5 * jnp.fft.fft(h))) + self.op(x)
        return h, h


def _batch_mix_ups() -> list[Callable[[], object]]:
    """A batched step given batch-major inputs, a state and trace of another batch size, and
    an unbatched state and trace."""
    _, params, _, step, _, state, trace = _setup(batch_size=BATCH)
    _, _, _, _, _, single_state, single_trace = _setup()
    batched = jax.vmap(step, in_axes=(None, 0, 0, 0))
    xs, targets = _sequence((BATCH + 1,))  # one sample more than the state and trace hold
    major_xs, major_targets = (jnp.swapaxes(a, 0, 1) for a in _sequence((BATCH,)))
    optimizer = optax.sgd(0.1)
    return [
        lambda: eqtrace.online_gradient(
            batched, squared_loss, params, state, trace, major_xs, major_targets
        ),
        lambda: eqtrace.online_gradient(batched, squared_loss, params, state, trace, xs, targets),
        lambda: eqtrace.run_online(batched, params, single_state, single_trace, xs),
        lambda: eqtrace.train_online(
            batched,
            squared_loss,
            optimizer,
            params,
            optimizer.init(params),
            single_state,
            single_trace,
            xs,
            targets,
        ),
    ]


def _optimizer_state_of_another_kind() -> list[Callable[[], object]]:
    """An optimiser state of another optimiser, or of other parameters."""
    _, params, _, step, _, state, trace = _setup()
    other = eqx.filter(_gru(HIDDEN + 1), eqx.is_inexact_array)
    xs, targets = _sequence()
    adam = optax.adam(1e-3)
    return [
        lambda: eqtrace.train_online(
            step,
            squared_loss,
            adam,
            params,
            optax.sgd(0.1).init(params),
            state,
            trace,
            xs,
            targets,
        ),
        lambda: eqtrace.train_online(
            step, squared_loss, adam, params, adam.init(other), state, trace, xs, targets
        ),
    ]


def _forward_step_to_an_online_driver() -> list[Callable[[], object]]:
    _, params, static, _, _, state, trace = _setup()
    forward = eqtrace.make_forward_step(static)
    xs, targets = _sequence()
    return [
        lambda: eqtrace.online_gradient(forward, squared_loss, params, state, trace, xs, targets),
        lambda: eqtrace.run_online(jax.jit(forward), params, state, trace, xs),
    ]


def _online_step_to_bptt() -> list[Callable[[], object]]:
    _, params, _, step, block, state, _ = _setup()
    xs, targets = _sequence()
    return [
        lambda: eqtrace.bptt_gradient(step, squared_loss, params, state, xs, targets),
        lambda: eqtrace.truncated_bptt_gradient(
            block, squared_loss, params, state, xs, targets, window=2
        ),
    ]


def _layers_that_do_not_chain() -> list[Callable[[], object]]:
    model = nn.Sequential([_gru(), eqx.nn.Linear(HIDDEN + 1, 2, key=_key(3))])
    return [
        lambda: eqtrace.DRTRL().init_trace(model, model.init_state()),
        lambda: eqtrace.check(model, eqtrace.PPProp(0.5)),
    ]


def _a_non_finite_loss_under_check_finite() -> list[Callable[[], object]]:
    rule = eqtrace.PPProp(0.5, check_finite=True)
    _, params, _, step, _, state, trace = _setup(rule, batch_size=BATCH)
    batched = jax.vmap(step, in_axes=(None, 0, 0, 0))
    xs, targets = _sequence((BATCH,))
    targets = targets.at[2, 1, 0].set(jnp.nan)
    optimizer = optax.sgd(0.1)
    return [
        lambda: eqtrace.online_gradient(batched, squared_loss, params, state, trace, xs, targets),
        lambda: eqtrace.train_online(
            batched,
            squared_loss,
            optimizer,
            params,
            optimizer.init(params),
            state,
            trace,
            xs,
            targets,
        ),
    ]


def _shardings_of_another_model() -> list[Callable[[], object]]:
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    shardings = eqtrace.make_shardings(
        nn.LSTMCell(INPUT, HIDDEN, key=_key()), eqtrace.DRTRL(), mesh
    )
    return [lambda: eqtrace.init_sharded(_gru(), eqtrace.DRTRL(), BATCH, shardings)]


def _spikes_of_a_model_that_does_not_spike() -> list[Callable[[], object]]:
    network = nn.Sequential([_gru(), eqx.nn.Linear(HIDDEN, 2, key=_key())])
    return [
        lambda: nn.spikes(_gru(), _gru().init_state()),
        lambda: nn.firing_rates(network, network.init_state()),
    ]


def _rates_of_a_single_step() -> list[Callable[[], object]]:
    lif = nn.LIF(INPUT, HIDDEN, key=_key())
    return [lambda: nn.firing_rates(lif, lif.init_state())]


def _a_batch_that_is_not_a_task_batch() -> list[Callable[[], object]]:
    lif = nn.LIF(INPUT, HIDDEN, key=_key())
    xs = jnp.zeros((LENGTH, BATCH, INPUT))
    # (A bare array is refused by the annotation check first, under the suite's beartype.)
    return [lambda: eqtrace.tasks.evaluate(lif, (xs,))]


def _a_nir_graph_with_a_node_eqtrace_does_not_import() -> list[Callable[[], object]]:
    import nir

    def graph(node):
        shape = np.array([INPUT])
        nodes = {"input": nir.Input(shape), "node": node, "output": nir.Output(shape)}
        return nir.NIRGraph(nodes=nodes, edges=[("input", "node"), ("node", "output")])

    ones = np.ones(INPUT)
    return [
        lambda: eqtrace.from_nir(graph(nir.IF(r=ones, v_threshold=ones))),
        lambda: eqtrace.from_nir(graph(nir.Delay(delay=ones))),
    ]


def _train_monitored(monitor, batch_size=BATCH, step=None) -> Callable[[], object]:
    """`train_online` of a GRU with `monitor`."""
    _, params, _, own_step, _, state, trace = _setup(batch_size=batch_size)
    if step is None:
        step = own_step if batch_size is None else jax.vmap(own_step, in_axes=(None, 0, 0, 0))
    xs, targets = _sequence(() if batch_size is None else (batch_size,))
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(params)
    return lambda: eqtrace.train_online(
        step, mse, optimizer, params, opt_state, state, trace, xs, targets, monitor=monitor
    )


def _monitored_sub_batch_too_large() -> list[Callable[[], object]]:
    return [
        _train_monitored(eqtrace.FidelityMonitor(every=2, samples=BATCH + 1)),
        _train_monitored(eqtrace.FidelityMonitor(every=2, samples=2), batch_size=None),
    ]


def _monitored_step_not_made_by_eqtrace() -> list[Callable[[], object]]:
    _, _, _, step, _, _, _ = _setup()

    def by_hand(params, state, trace, x):
        return step(params, state, trace, x)

    return [_train_monitored(eqtrace.FidelityMonitor(every=2), batch_size=None, step=by_hand)]


def _synthetic_setup():
    """A GRU, its forward step, a predictor of it, and a sequence."""
    model, params, static, *_ = _setup()
    forward = eqtrace.make_forward_step(static)
    xs, targets = _sequence()
    return model, params, static, forward, eqtrace.SyntheticGradient(model), xs, targets


def _synthetic_gradient_with_a_trace():
    """Synthetic gradients given an online block of exact windows, or an online step."""
    _, params, static, _, predictor, xs, targets = _synthetic_setup()
    state = _gru().init_state()
    windows = eqtrace.make_online_block(eqtrace.ExactWindows(eqtrace.DRTRL()), static)
    step = eqtrace.make_online_step(eqtrace.DRTRL(), static)
    return [
        lambda f=f: eqtrace.synthetic_gradient(f, mse, params, predictor, state, xs, targets, 2)
        for f in (windows, step)
    ]


def _predictor_of_another_state():
    """A predictor of a GRU of another size, and of a network whose state is a tuple."""
    _, params, _, forward, _, xs, targets = _synthetic_setup()
    state = _gru().init_state()
    bigger = eqtrace.SyntheticGradient(_gru(HIDDEN + 1))
    network = nn.Sequential([_gru(), eqx.nn.Linear(HIDDEN, 2, key=_key())])
    other = eqtrace.SyntheticGradient(network)
    return [
        lambda g=g: eqtrace.synthetic_gradient(forward, mse, params, g, state, xs, targets, 2)
        for g in (bigger, other)
    ]


def _synthetic_optimiser_state_of_the_parameters():
    _, params, _, forward, predictor, xs, targets = _synthetic_setup()
    state = _gru().init_state()
    adam = optax.adam(1e-3)
    return [
        lambda: eqtrace.train_synthetic(
            forward, mse, adam, params, predictor, adam.init(params), state, xs, targets, 2
        )
    ]


#: Title of a row of `docs/errors.md` -> functions that each commit that misuse.
def _modulator_of_the_wrong_shape():
    """A per-neuron modulator without the batch axis, and modulators that kept their time
    axis, given to a driver's vmapped step."""
    _, params, _, step, _, state, trace = _setup(eqtrace.DRTRL(), batch_size=BATCH)
    batched = jax.vmap(step, in_axes=(None, 0, 0, 0))
    xs, _ = _sequence((BATCH,))
    return [
        lambda: eqtrace.modulated_loss(jnp.ones((BATCH, HIDDEN)), jnp.ones((LENGTH, BATCH))),
        lambda: eqtrace.online_gradient(
            batched, eqtrace.modulated_loss, params, state, trace, xs, jnp.ones((LENGTH, HIDDEN))
        ),
    ]


CASES: dict[str, Callable[[], list[Callable[[], object]]]] = {
    "Targets without a time axis": _per_sequence_targets,
    "Step weights of the wrong shape": _step_weights_of_wrong_shape,
    "An unknown `reduction`": _unknown_reduction,
    "Inputs of different lengths": _inputs_of_different_lengths,
    "A loss that is not a scalar": _loss_not_scalar,
    "Parameters of another model": _params_of_another_model,
    "An online step given a `block_size`": _step_given_block_size,
    "An online block without a `block_size`": _block_without_block_size,
    "A `block_size` or `window` that is not an int": _count_of_wrong_type,
    "A mean over no steps": _mean_over_no_steps,
    "Sequence targets that kept their time axis": _sequence_targets_with_a_time_axis,
    "A batch size below one": lambda: [
        lambda: eqtrace.init_state_and_trace(_gru(), eqtrace.DRTRL(), batch_size=0),
        lambda: eqtrace.init_state_and_trace(_gru(), eqtrace.DRTRL(), batch_size=-1),
    ],
    "A `block_size` or `window` below one": _count_below_one,
    "A fidelity monitor's count below one": lambda: [
        lambda: eqtrace.FidelityMonitor(every=0),
        lambda: eqtrace.FidelityMonitor(every=10, samples=0),
        lambda: eqtrace.FidelityMonitor(every=10, window=-1),
    ],
    "An unknown fidelity reference": lambda: [
        lambda: eqtrace.FidelityMonitor(every=10, reference="bptt")
    ],
    "A window with the RTRL reference": lambda: [
        lambda: eqtrace.FidelityMonitor(every=10, reference="rtrl", window=5)
    ],
    "A monitored sub-batch larger than the batch": _monitored_sub_batch_too_large,
    "A monitored step eqtrace did not make": _monitored_step_not_made_by_eqtrace,
    "Batch sizes that do not match": _batch_mix_ups,
    "An optimiser state of another optimiser or model": _optimizer_state_of_another_kind,
    "A forward step given to an online driver": _forward_step_to_an_online_driver,
    "An online step given to a BPTT driver": _online_step_to_bptt,
    "A non-finite loss under `check_finite`": _a_non_finite_loss_under_check_finite,
    "Layers whose sizes do not chain": _layers_that_do_not_chain,
    "Shardings of another model": _shardings_of_another_model,
    "Complex or non-numeric input": _complex_input,
    "Input of the wrong shape": _input_of_wrong_shape,
    "State of the wrong shape or structure": _state_of_wrong_shape,
    "Trace of another algorithm or model": _trace_of_another_algorithm,
    "A model whose masks are traced": _traced_mask,
    "A step that changes the state's dtype": _step_changes_state_dtype,
    "An example input with an extra axis": _example_input_with_an_extra_axis,
    "An example input the cell cannot take": _example_input_the_cell_cannot_take,
    "A parameter outside the step": _parameter_outside_the_step,
    "pp-prop with only one of `input_decay` and `output_decay`": lambda: [
        lambda: eqtrace.PPProp(input_decay=0.5),
        lambda: eqtrace.PPProp(0.5, input_decay=0.2, output_decay=0.3),
    ],
    "A recurrent layer under OTPE": lambda: [
        _init(eqtrace.OTPE(leak=0.9), nn.LIF(INPUT, HIDDEN, recurrent=True, key=_key())),
    ],
    "OTPE without `leak` on a cell whose leak it cannot read": lambda: [
        _init(eqtrace.OTPE(), nn.LIF(INPUT, HIDDEN, key=_key())),
        _init(eqtrace.OTPE(), nn.LIF(INPUT, HIDDEN, synapse=True, detach_reset=True, key=_key())),
    ],
    "Approximate OTPE on a cell with parameters outside its ops": lambda: [
        _init(
            eqtrace.OTPE(leak=0.9, approximate=True),
            nn.LIF(INPUT, HIDDEN, learn_tau=True, key=_key()),
        ),
    ],
    "An OTPE leak outside (0, 1)": lambda: [
        lambda: eqtrace.OTPE(leak=1.0),
        lambda: eqtrace.OTPE(leak=0.0),
    ],
    "A cell without a constant leak under OTTT": lambda: [
        _init(eqtrace.OTTT(), nn.LIF(INPUT, HIDDEN, key=_key()), None),
        _init(eqtrace.OTTT(), nn.GRUCell(INPUT, HIDDEN, key=_key()), None),
    ],
    "A model that is not an eqtrace cell or network": lambda: [
        lambda: eqtrace.make_online_step(
            eqtrace.DRTRL(), eqx.partition(eqx.nn.Sequential([_gru()]), eqx.is_inexact_array)[1]
        ),
        lambda: eqtrace.make_forward_step(lambda state, x: _gru()(state, x)),
    ],
    "No example input": lambda: [
        _init(eqtrace.DRTRL(), Rolling(INPUT, HIDDEN, key=_key()), None),
        lambda: eqtrace.check(Rolling(INPUT, HIDDEN, key=_key())),
    ],
    "A size that is not a positive int": lambda: [
        *_every_cell(hidden_size=0),
        *_every_cell(input_size=-1),
        lambda: nn.LRUCell(INPUT, HIDDEN, output_size=0, key=_key()),
    ],
    "A mask of the wrong shape": lambda: [
        lambda: nn.Linear(INPUT, HIDDEN, mask=jnp.ones((INPUT, HIDDEN), bool), key=_key())
    ],
    "A recurrent mask without recurrence": lambda: [
        lambda: nn.LIF(INPUT, HIDDEN, recurrent_mask=jnp.ones((HIDDEN, HIDDEN), bool), key=_key())
    ],
    "A time constant, threshold or time step that is not positive": lambda: [
        lambda: nn.LIF(INPUT, HIDDEN, tau_mem=0.0, key=_key()),
        lambda: nn.ALIF(INPUT, HIDDEN, threshold=-1.0, key=_key()),
        lambda: nn.LIF(INPUT, HIDDEN, threshold=float("inf"), key=_key()),
    ],
    "A read-out time constant that is not positive": lambda: [
        lambda: nn.LeakyReadout(INPUT, HIDDEN, tau=0.0, key=_key())
    ],
    "A negative adaptation strength": lambda: [
        lambda: nn.ALIF(INPUT, HIDDEN, beta=-0.1, key=_key())
    ],
    "An unstable LRU ring": lambda: [lambda: nn.LRUCell(INPUT, HIDDEN, r_max=1.0, key=_key())],
    "A surrogate parameter that is not positive": lambda: [
        lambda: nn.surrogate.FastSigmoid(0.0),
        lambda: nn.surrogate.sigmoid(jnp.zeros(3), steepness=-1.0),
    ],
    "A feedback matrix of the wrong shape": lambda: [
        lambda: nn.RandomFeedback(nn.Linear(4, 2, key=_key()), jnp.zeros((4, 2))),
    ],
    "Random feedback without exactly one of `feedback` and `key`": lambda: [
        lambda: nn.RandomFeedback(nn.Linear(4, 2, key=_key())),
        lambda: nn.RandomFeedback(nn.Linear(4, 2, key=_key()), jnp.zeros((2, 4)), key=_key()),
    ],
    "A network without a cell": lambda: [
        lambda: nn.Sequential([eqx.nn.Linear(INPUT, HIDDEN, key=_key())])
    ],
    "pp-prop without exactly one of `decay` and `rank`": lambda: [
        lambda: eqtrace.PPProp(),
        lambda: eqtrace.PPProp(0.5, rank=3),
    ],
    "A pp-prop rank below one": lambda: [lambda: eqtrace.PPProp(rank=0.5)],
    "A pp-prop decay outside [0, 1)": lambda: [lambda: eqtrace.PPProp(1.0)],
    "A SnAp-n order below one": lambda: [lambda: eqtrace.SnAp(0), lambda: eqtrace.SnAp(-2)],
    "A step SnAp-n cannot differentiate in reverse mode": lambda: [
        _init(eqtrace.SnAp(), Untraceable(key=_key())),
    ],
    "A cell that mixes neurons outside its ops": lambda: [
        _init(eqtrace.DRTRL(), Rolling(INPUT, HIDDEN, key=_key())),
        _init(eqtrace.PPProp(0.5), Rolling(INPUT, HIDDEN, key=_key())),
    ],
    "A large parameter outside any op": lambda: [
        _init(eqtrace.DRTRL(), RawWeight(key=_key())),
        _init(eqtrace.PPProp(0.5, strict=False), RawWeight(key=_key())),
    ],
    "State leaves of different shapes": lambda: [_init(eqtrace.DRTRL(), GlobalLeaf(key=_key()))],
    "Complex state leaves under a diagonal rule": lambda: [
        _init(eqtrace.SnAp1(), ComplexState(key=_key()))
    ],
    "Integer or boolean state leaves under a diagonal rule": lambda: [
        _init(eqtrace.DRTRL(), RefractoryCount(key=_key())),
        _init(eqtrace.PPProp(0.5), RefractoryCount(key=_key())),
    ],
    "A grouped op whose sizes the groups do not divide": lambda: [
        lambda: nn.GroupedLinear(5, 6, 2, key=_key()),
        lambda: nn.GroupedLinear(4, 6, 4, key=_key()),
    ],
    "An einsum op with an equation it does not take": lambda: [
        lambda: nn.EinsumLinear("oi,i", (3,), (4, 3), key=_key()),
        lambda: nn.EinsumLinear("i...,oi->o", (3,), (4, 3), key=_key()),
        lambda: nn.EinsumLinear("ii,oi->o", (3, 3), (4, 3), key=_key()),
        lambda: nn.EinsumLinear("i,oi->ok", (3,), (4, 3), key=_key()),
    ],
    "An einsum op whose shapes do not fit its equation": lambda: [
        lambda: nn.EinsumLinear("i,oi->o", (3,), (4, 2), key=_key()),
        lambda: nn.EinsumLinear("i,oi->o", (3, 1), (4, 3), key=_key()),
        lambda: nn.EinsumLinear("i,oi->o", (3,), (4, 3), key=_key())(jnp.zeros(4)),
    ],
    "An op input of several neurons under SnAp-1": lambda: [
        _init(eqtrace.SnAp1(), NormalisedInput(key=_key()), jnp.zeros(INPUT))
    ],
    "An e-prop read-out decay outside [0, 1)": lambda: [
        lambda: eqtrace.EProp(readout_decay=1.0),
        lambda: eqtrace.EProp(readout_decay=-0.5),
    ],
    "An e-prop read-out decay for a network": lambda: [
        _init(
            eqtrace.EProp(readout_decay=0.9),
            nn.Sequential([_gru(), nn.LeakyReadout(HIDDEN, 2, key=_key())]),
        )
    ],
    "A rule `Filtered` cannot wrap": lambda: [
        lambda: eqtrace.Filtered(eqtrace.EProp()),
        lambda: eqtrace.Filtered(eqtrace.PPProp(0.9)),
        lambda: eqtrace.Filtered(eqtrace.RTRL()),
    ],
    "An output e-prop cannot filter": lambda: [
        _init(
            eqtrace.EProp(),
            nn.Sequential(
                [
                    nn.LRUCell(INPUT, HIDDEN, output_size=3, key=_key()),
                    nn.LeakyReadout(3, 2, key=_key()),
                ]
            ),
        ),
        _init(eqtrace.EProp(readout_decay=0.9), RolledOutput(key=_key())),
    ],
    "An output that is not `output(new_state)`": lambda: [
        _init(eqtrace.RTRL(), OutputNotOfState(key=_key()), jnp.zeros(3))
    ],
    "A parameter in the output and the state under a leaky read-out": lambda: [
        _init(
            eqtrace.EProp(),
            nn.Sequential([SharedThreshold(key=_key()), nn.LeakyReadout(HIDDEN, 2, key=_key())]),
        )
    ],
    "A step the analysis does not know": lambda: [
        _init(eqtrace.DRTRL(), SpectralCell(key=_key()), jnp.zeros(INPUT))
    ],
    "Op weights used outside a call": lambda: [
        _init(eqtrace.DRTRL(), RawWeightUse(key=_key()), jnp.zeros(4)),
        _init(eqtrace.PPProp(0.5), RawWeightUse(key=_key()), jnp.zeros(4)),
    ],
    "An op called inside a transformation": lambda: [
        _init(eqtrace.DRTRL(), VmappedOp(key=_key()), jnp.zeros((4, 3))),
        _init(eqtrace.PPProp(0.5, strict=False), VmappedOp(key=_key()), jnp.zeros((4, 3))),
    ],
    "An op called with weights other than its own": lambda: [
        _init(eqtrace.DRTRL(), WeightNormed(key=_key()), jnp.zeros(4)),
    ],
    "A checkpoint of another algorithm": lambda: [_restore(algorithm=eqtrace.DRTRL())],
    "A checkpoint of other hyperparameters": lambda: [
        _restore(algorithm=eqtrace.PPProp(rank=4)),
        _restore(algorithm=eqtrace.PPProp(rank=8, bias_correction=False)),
    ],
    "A checkpoint of another model": lambda: [
        _restore(model=nn.LIF(INPUT, HIDDEN + 1, key=_key())),
        _restore(model=nn.LIF(INPUT, HIDDEN, dtype=jnp.float32, key=_key())),
        _restore(model=nn.LIF(INPUT, HIDDEN, reset="zero", key=_key())),
        _restore(model=_gru()),
    ],
    "A `like` that does not fit the checkpoint": lambda: [
        _restore(like=lambda tree: {**tree, "state": _batched(tree["state"])}),
        _restore(like=lambda tree: {**tree, "steps": 0}),
    ],
    "No checkpoint to restore": lambda: [
        _restore(directory=_directory()),
        _restore(directory=_directory() + "/absent"),
        _restore(step=2),
    ],
    "A step saved twice": lambda: [_saved_twice()],
    "A step below the latest": lambda: [_below_the_latest()],
    "A second writer": lambda: [_second_writer()],
    "An incomplete or damaged checkpoint": lambda: [
        _damaged(lambda folder: shutil.rmtree(folder / "arrays")),
        _damaged(lambda folder: _truncate(folder / "metadata" / "metadata")),
        _damaged(lambda folder: _truncate(folder / "arrays" / "manifest.ocdbt")),
        _bit_flipped(),
    ],
    "No readable checkpoint left": lambda: [_all_damaged()],
    "An incomplete step folder in the way": lambda: [_folder_in_the_way()],
    "`max_to_keep` below one": lambda: [
        lambda: eqtrace.save_checkpoint(
            _directory(),
            1,
            {},
            algorithm=eqtrace.DRTRL(),
            model=nn.LIF(INPUT, HIDDEN, key=_key()),
            max_to_keep=0,
        )
    ],
    "An algorithm passed as the model": lambda: [
        lambda: eqtrace.save_checkpoint(
            _directory(), 1, {}, algorithm=eqtrace.DRTRL(), model=eqtrace.PPProp(rank=8)
        ),
        _restore(model=eqtrace.PPProp(rank=8)),
    ],
    "A file as the checkpoint directory": lambda: [
        lambda: eqtrace.latest_checkpoint(_a_file()),
        lambda: eqtrace.save_checkpoint(
            _a_file(), 1, {}, algorithm=eqtrace.DRTRL(), model=nn.LIF(INPUT, HIDDEN, key=_key())
        ),
        _restore(directory=_a_file()),
    ],
    "A step that is not a non-negative int": lambda: [
        lambda: eqtrace.save_checkpoint(
            _directory(), -1, {}, algorithm=eqtrace.DRTRL(), model=nn.LIF(INPUT, HIDDEN, key=_key())
        ),
        _restore(step=-3),
    ],
    "UORO without a key": lambda: [lambda: eqtrace.UORO()],
    "A `custom_vjp` function under UORO or LowRankRTRL": lambda: [
        _init(eqtrace.UORO(key=_key()), VJPSurrogate(key=_key())),
        _init(eqtrace.LowRankRTRL(2), VJPSurrogate(key=_key())),
    ],
    "A negative rank, or no iterations, for LowRankRTRL": lambda: [
        lambda: eqtrace.LowRankRTRL(rank=-1),
        lambda: eqtrace.LowRankRTRL(iterations=0),
    ],
    "A raw PRNG key": lambda: [
        lambda: eqtrace.UORO(key=jr.PRNGKey(0)),
        lambda: eqtrace.init_state_and_trace(
            _gru(), eqtrace.UORO(key=_key()), BATCH, key=jr.PRNGKey(0)
        ),
    ],
    "Several keys where one belongs": lambda: [
        lambda: eqtrace.UORO(key=jr.split(_key(), BATCH)),
        lambda: eqtrace.init_state_and_trace(
            _gru(), eqtrace.UORO(key=_key()), BATCH, key=jr.split(_key(), BATCH)
        ),
    ],
    "A mesh without the named axis": lambda: [
        lambda: eqtrace.make_shardings(_gru(), eqtrace.DRTRL(), _mesh(("data",)))
    ],
    "Model parallelism for a rule without neuron-split traces": lambda: [
        lambda: eqtrace.make_shardings(
            _gru(), eqtrace.RTRL(), _mesh(("batch", "model")), model_axis="model"
        )
    ],
    "An explicit model axis": lambda: [
        lambda: eqtrace.make_shardings(
            _gru(),
            eqtrace.DRTRL(),
            jax.make_mesh((1, 1), ("batch", "model"), devices=jax.devices()[:1]),
            model_axis="model",
        )
    ],
    "A batch that does not split evenly": lambda: [_uneven_batch],
    "Exact windows of e-prop under a leaky read-out": lambda: [
        lambda: eqtrace.ExactWindows(eqtrace.EProp(readout_decay=0.9)),
        lambda: eqtrace.init_state_and_trace(
            nn.Sequential(
                [nn.LIF(INPUT, HIDDEN, key=_key()), nn.LeakyReadout(HIDDEN, 2, key=_key())]
            ),
            eqtrace.ExactWindows(eqtrace.EProp()),
        ),
    ],
    "Windows of windows": lambda: [
        lambda: eqtrace.ExactWindows(eqtrace.ExactWindows(eqtrace.DRTRL()))
    ],
    "A pp-prop decay that rounds to one": lambda: [
        _init(
            eqtrace.PPProp(rank=1e9),
            cast(CalledOutOfOrder(key=_key()), jnp.float32),
            jnp.zeros(3, jnp.float32),
        )
    ],
    "Spikes of a model that does not spike": _spikes_of_a_model_that_does_not_spike,
    "Rates of a single step": _rates_of_a_single_step,
    "A batch that is not a task batch": _a_batch_that_is_not_a_task_batch,
    "A layer without a NIR counterpart": lambda: [
        lambda: eqtrace.to_nir(nn.Sequential([_gru(), eqx.nn.Linear(HIDDEN, 2, key=_key())])),
        lambda: eqtrace.to_nir(nn.Sequential([nn.LIF(INPUT, HIDDEN, key=_key()), jax.nn.relu])),
    ],
    "An ALIF layer with a zero reset": lambda: [
        lambda: eqtrace.to_nir(nn.ALIF(INPUT, HIDDEN, reset="zero", key=_key()))
    ],
    "A NIR node eqtrace does not import": _a_nir_graph_with_a_node_eqtrace_does_not_import,
    "A modulator of the wrong shape": _modulator_of_the_wrong_shape,
    "A modulator that is not floating": lambda: [
        lambda: eqtrace.modulated_loss(jnp.ones((BATCH, HIDDEN)), jnp.ones(BATCH, jnp.int32)),
        lambda: eqtrace.modulated_loss(jnp.ones(HIDDEN), jnp.ones(HIDDEN, bool)),
    ],
    "A modulator of another structure": lambda: [
        lambda: eqtrace.modulated_loss(jnp.ones(HIDDEN), (jnp.ones(HIDDEN), jnp.ones(HIDDEN))),
        lambda: eqtrace.modulated_loss((jnp.ones(2), jnp.ones(3)), [jnp.ones(2), jnp.ones(3)]),
    ],
    "A synthetic gradient with a rule's trace": _synthetic_gradient_with_a_trace,
    "A predictor of another state": _predictor_of_another_state,
    "A random predictor without a key": lambda: [
        lambda: eqtrace.SyntheticGradient(_gru(), scale=0.1)
    ],
    "An optimiser state of the parameters alone": _synthetic_optimiser_state_of_the_parameters,
    "Modulating values that are not floating": lambda: [
        lambda: eqtrace.modulated_loss(jnp.array([0, 1]), jnp.ones(2)),
        lambda: eqtrace.modulated_loss(jnp.ones(HIDDEN) > 0, 1.0),
    ],
}


def _documented_errors() -> dict[str, tuple[str, list[str]]]:
    """The rows of the `| Misuse | Error | Fix |` tables of the errors page: title ->
    (exception type, the message's key phrases in order)."""
    rows: dict[str, tuple[str, list[str]]] = {}
    in_table = False
    for line in ERRORS_PAGE.read_text().splitlines():
        if re.fullmatch(r"\|\s*Misuse\s*\|\s*Error\s*\|\s*Fix\s*\|", line.strip()):
            in_table = True
            continue
        if not (in_table and line.startswith("|")):
            in_table = False
            continue
        if set(line) <= set("|- :"):
            continue  # the separator row
        misuse, error, _fix = (cell.strip() for cell in line.strip().strip("|").split(" | "))
        title = re.match(r"\*\*(.+?)\*\*", misuse)
        exception = re.match(r"`(\w+)`: (.*)", error)
        assert title and exception, f"malformed row of {ERRORS_PAGE.name}: {line}"
        assert title.group(1) not in rows, f"duplicate row {title.group(1)!r}"
        phrases = [p.strip() for p in exception.group(2).split("…") if p.strip()]
        rows[title.group(1)] = (exception.group(1), phrases)
    return rows


DOCUMENTED = _documented_errors()


def test_errors_page_lists_every_case():
    assert set(DOCUMENTED) == set(CASES)


#: Rows whose triggers fail Orbax mid-read: that leaves coroutines unawaited, which Python
#: reports when they are collected (collected at the end of the row's test, and ignored).
_FAILED_READS = {"An incomplete or damaged checkpoint", "No readable checkpoint left"}
_ignore_failed_reads = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.parametrize(
    "title",
    [pytest.param(t, marks=_ignore_failed_reads) if t in _FAILED_READS else t for t in CASES],
)
def test_documented_error(title):
    exception_name, phrases = DOCUMENTED[title]
    exception = {
        "ValueError": ValueError,
        "StructureError": eqtrace.StructureError,
        "TypeError": TypeError,
        "FileNotFoundError": FileNotFoundError,
        "NotADirectoryError": NotADirectoryError,
        "CheckpointDamagedError": eqtrace.CheckpointDamagedError,
        "CheckpointLockedError": eqtrace.CheckpointLockedError,
        "EquinoxRuntimeError": eqx.EquinoxRuntimeError,
    }[exception_name]
    for trigger in CASES[title]():
        with pytest.raises(Exception) as info:
            trigger()
        assert type(info.value) is exception, f"{title}: {info.value!r}"
        message = " ".join(str(info.value).split())
        position = 0
        for phrase in phrases:
            found = message.find(phrase, position)
            assert found >= 0, f"{title}: {phrase!r} not (in order) in {message!r}"
            position = found + len(phrase)
    if title in _FAILED_READS:
        gc.collect()


def test_errors_name_what_was_received():
    """The variable parts of a few messages: the shapes, lengths and values received."""
    with pytest.raises(ValueError, match=r"length 6 of `xs`.*of shape \(2, 4\)") as info:
        _per_sequence_targets()[0]()
    assert "`step_weights=jnp.arange(6) == 5`" in str(info.value)
    with pytest.raises(ValueError, match=r"`xs\[0\]` \(6, 3\), `xs\[1\]` \(5, 3\)"):
        _inputs_of_different_lengths()[0]()
    with pytest.raises(ValueError, match=r"returned shape \(4,\) and dtype float64"):
        _loss_not_scalar()[0]()
    with pytest.raises(ValueError, match=r"`params` is of type LSTMCell and `static` of type GRU"):
        _params_of_another_model()[0]()
    with pytest.raises(ValueError, match=r"`.hidden_size` is 5 in `params` and 4 in `static`"):
        _params_of_another_model()[1]()
    with pytest.raises(TypeError, match=r"`x` .* but received dtype complex128; split"):
        _complex_input()[0]()
    with pytest.raises(TypeError, match=r"`x` .* but received dtype str32; convert"):
        _complex_input()[3]()
    with pytest.raises(ValueError, match=r"LSTMCell: `hidden_size` .* received 0 \(int\)"):
        _every_cell(hidden_size=0)[2]()


@pytest.mark.parametrize(
    ("kind", "hidden", "replacement"),
    [
        ("GRUCell", 4, "`eqtrace.nn.GRUCell`"),  # Small: refused as mixing neurons.
        ("GRUCell", 64, "`eqtrace.nn.GRUCell`"),  # Large: refused as untraceable parameters.
        ("LSTMCell", 4, "`eqtrace.nn.LSTMCell`"),
    ],
)
def test_refusals_name_the_equinox_layer_and_its_replacement(kind, hidden, replacement):
    model = WrappedEquinoxCell(kind, hidden, key=_key())
    with pytest.raises(ValueError, match="DRTRL cannot trace") as error:
        eqtrace.init_state_and_trace(model, eqtrace.DRTRL())
    assert f"`.layer` is an `eqx.nn.{type(model.layer).__name__}`" in str(error.value)
    assert f"hold {replacement} instead" in str(error.value)


def test_wrong_types_without_beartype():
    """Floats where ints belong. Under this suite's jaxtyping/beartype hook the annotation
    check answers first (a `TypeError` naming the argument); without it, eqtrace's own check
    does, as checked in a fresh interpreter."""
    cases = {  # call -> the key phrase of its error
        "eqtrace.nn.RNNCell(3, 2.5, key=key)": (
            "ValueError: RNNCell: `hidden_size` must be a positive int (a number of features), "
            "but received 2.5 (float)"
        ),
        "eqtrace.nn.Linear(3.0, 4, key=key)": "ValueError: Linear: `in_features` must be",
        "eqtrace.SnAp(1.5)": "ValueError: SnAp: `n` must be an integer ≥ 1",
        "eqtrace.online_gradient(block, loss, params, state, trace, xs, targets, block_size=2.5)": (
            "TypeError: online_gradient: `block_size` must be a Python int (a number of steps), "
            "but received 2.5 (float)"
        ),
        "eqtrace.truncated_bptt_gradient(forward, loss, params, state, xs, targets, 2.0)": (
            "TypeError: truncated_bptt_gradient: `window` must be a Python int"
        ),
        "eqtrace.init_state_and_trace(eqx.nn.Sequential([model]), eqtrace.DRTRL())": (
            "TypeError: init_state_and_trace: `model` must be an eqtrace cell"
        ),
        "eqtrace.check(lambda state, x: model(state, x), x=jnp.zeros(3))": (
            "TypeError: check: `model` must be an eqtrace cell"
        ),
        "eqtrace.init_state_and_trace(model, eqtrace.DRTRL(), batch_size=2.0)": (
            "TypeError: init_state_and_trace: `batch_size` must be a Python int (the number of "
            "sequences in a batch) or None, but received 2.0 (float)."
        ),
        "eqtrace.online_gradient(block, loss, params, state, trace, xs, targets, "
        "block_size=np.int64(2))": (
            "TypeError: online_gradient: `block_size` must be a Python int (a number of steps), "
            "but received a traced "
        ),
        "eqtrace.save_checkpoint(tempfile.mkdtemp(), 1, {}, "
        "algorithm=model, model=eqtrace.DRTRL())": (
            "TypeError: save_checkpoint: `model` must be the model (a cell or network), but "
            "received the algorithm DRTRL. They look swapped"
        ),
        "eqtrace.train_online(eqtrace.make_online_step(eqtrace.DRTRL(), static), loss, None, "
        "params, None, state, trace, xs, targets)": (
            "TypeError: train_online: `optimizer` must be an Optax optimiser (with `init` and "
            "`update`, e.g. `optax.adam(1e-3)`), but received None."
        ),
        "eqtrace.OTPE(leak=0.5, approximate='yes')": (
            "TypeError: OTPE: `approximate` must be True (approximate OTPE) or False (OTPE), "
            "but received 'yes'."
        ),
        "eqtrace.ExactWindows(eqtrace.DRTRL)": (
            "TypeError: ExactWindows: `rule` must be an online rule (an instance of "
            "`eqtrace.AbstractAlgorithm`), but received DRTRL."
        ),
    }
    script = textwrap.dedent(
        """
        import tempfile
        import equinox as eqx, jax, jax.numpy as jnp, numpy as np
        import eqtrace
        key = jax.random.key(0)
        model = eqtrace.nn.GRUCell(3, 4, key=key)
        params, static = eqx.partition(model, eqx.is_inexact_array)
        state, trace = eqtrace.init_state_and_trace(model, eqtrace.DRTRL())
        block = eqtrace.make_online_block(eqtrace.DRTRL(), static)
        forward = eqtrace.make_forward_step(static)
        xs, targets = jnp.zeros((6, 3)), jnp.zeros((6, 4))
        loss = lambda y, t: jnp.sum((y - t) ** 2)
        for call in CALLS:
            try:
                eval(call)
            except Exception as e:
                print(type(e).__name__ + ": " + " ".join(str(e).split()))
            else:
                print("no error")
        """
    ).replace("CALLS", repr(list(cases)))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(cases), result.stdout + result.stderr
    for line, (call, phrase) in zip(lines, cases.items()):
        assert line.startswith(phrase), (call, line)
    # Under the hook, the same calls are refused too, naming the argument.
    with pytest.raises(TypeError, match="hidden_size"):
        nn.RNNCell(3, 2.5, key=_key())  # pyright: ignore[reportArgumentType]


def test_steps_and_blocks_are_recognised_through_wrappers():
    from eqtrace._drivers import _kind

    _, _, _, step, block, _, _ = _setup()
    for wrap in [
        lambda f: f,
        lambda f: jax.vmap(f, in_axes=(None, 0, 0, 0)),
        lambda f: eqx.filter_vmap(f, in_axes=(None, 0, 0, 0)),
        lambda f: jax.vmap(jax.vmap(f, in_axes=(None, 0, 0, 0)), in_axes=(None, 0, 0, 0)),
        jax.jit,
        eqx.filter_jit,
    ]:
        assert _kind(wrap(step)) == "step"
        assert _kind(wrap(block)) == "block"
    # A step written by hand is not recognised, and so not checked: it runs as before.
    assert _kind(lambda p, s, t, x: step(p, s, t, x)) is None


def test_checked_steps_still_jit_vmap_and_differentiate():
    _, params, _, step, block, state, trace = _setup(eqtrace.DRTRL(), batch_size=BATCH)
    xs, targets = _sequence((BATCH,))
    batched = jax.vmap(step, in_axes=(None, 0, 0, 0))
    batched_block = eqx.filter_vmap(block, in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1))

    def stepped_loss(params):
        _, _, y = batched(params, state, trace, xs[0])
        return mse(y, targets[0])

    def blocked_loss(params):
        _, _, ys = batched_block(params, state, trace, xs[:1])
        return mse(ys[0], targets[0])

    def sample_loss(params):
        _, _, y = jax.jit(step)(params, state[0], trace_0, xs[0, 0])
        return squared_loss(y, targets[0, 0])

    trace_0 = jax.tree.map(lambda a: a[0], trace)
    grads = eqx.filter_jit(jax.grad(stepped_loss))(params)
    for other in [jax.grad(blocked_loss)(params), jax.grad(stepped_loss)(params)]:
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other)):
            assert jnp.allclose(a, b, rtol=1e-10, atol=1e-12)
    jax.grad(sample_loss)(params)


# Building a cell compiles its initialisers afresh in each dtype. By default each cell in one
# 16-bit dtype (test_cells.py builds and runs every cell in float32 and float64); every pair,
# and every dtype, under `LONG`.
@pytest.mark.parametrize(
    "name, dtype",
    pairs(
        EVERY_CELL,
        [jnp.bfloat16, jnp.float16, *([jnp.float32, jnp.float64] if LONG else [])],
    ),
)
def test_every_cell_builds_and_runs_in_every_float_dtype(name, dtype):
    cell = make_cell(name, _key(), INPUT, HIDDEN, dtype)
    arrays = [a for a in jax.tree.leaves(cell) if eqx.is_inexact_array(a)]
    assert arrays and all(a.dtype == dtype for a in arrays)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in arrays)
    state, y = cell(cell.init_state(), jnp.ones(INPUT, dtype))
    for leaf in jax.tree.leaves((state, y)):
        assert leaf.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(leaf)))


def test_example_input_has_the_models_dtype():
    # x64 is on in this suite, so JAX's default float is float64.
    assert example_input(nn.GRUCell(INPUT, HIDDEN, dtype=jnp.float32, key=_key())).dtype == (
        jnp.float32
    )
    assert example_input(_gru()).dtype == jnp.float64
    network = nn.Sequential(
        [
            nn.LIF(INPUT, HIDDEN, dtype=jnp.bfloat16, key=_key()),
            eqx.nn.Linear(HIDDEN, 2, key=_key()),
        ]
    )
    assert example_input(network).dtype == jnp.bfloat16
    # A float32 model is analysed, and stepped, with float32 inputs.
    model = nn.MinGRUCell(INPUT, HIDDEN, dtype=jnp.float32, key=_key())
    for algorithm in [case.algorithm for case in ALGORITHMS]:
        state, trace = eqtrace.init_state_and_trace(model, algorithm)
        _, new_trace, y = algorithm.step(model, state, trace, jnp.ones(INPUT, jnp.float32))
        assert y.dtype == jnp.float32
        assert jax.tree.structure(new_trace) == jax.tree.structure(trace)


def test_a_checkpoint_of_another_optimiser_is_described_by_structure():
    """Restoring into a learner with another optimiser names the entry whose structure
    differs, instead of comparing unrelated leaves one by one."""
    model, algorithm = _gru(), eqtrace.DRTRL()
    params = eqx.filter(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm)
    tree = {"params": params, "opt_state": optax.adam(1e-3).init(params), "state": state}
    directory = _directory()
    eqtrace.save_checkpoint(directory, 1, tree, algorithm=algorithm, model=model)
    chained = optax.chain(optax.clip(1.0), optax.adam(1e-3)).init(params)
    for like, words in [
        ({**tree, "opt_state": chained}, "`['opt_state']` has another structure: the checkpoint"),
        ({**tree, "opt_state": optax.sgd(0.1).init(params)}, "leaves under `['opt_state']`"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            eqtrace.restore_checkpoint(directory, like, algorithm=algorithm, model=model)
