"""e-prop against its oracles: BPTT for a feed-forward layer under a leaky read-out (where
D-RTRL is not exact), D-RTRL where there is no leaky read-out, blocks against steps, and its
filter by hand. (RTRL at the first step: test_generated.py, and the registry's oracles.)"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqtrace
from eqtrace import nn
from helpers import (
    LONG,
    LeakyCurrent,
    cast,
    online_and_bptt,
    relative_error,
    squared_loss,
)


LENGTH, INPUT, HIDDEN, OUTPUT = 10, 3, 4, 2


def _feed_forward(name, key):
    """Spiking layers without recurrent weights (ALIF with per-neuron parameters)."""
    if name == "lif":
        return nn.LIF(INPUT, HIDDEN, tau_mem=5.0, reset="zero", key=key)
    return nn.ALIF(INPUT, HIDDEN, synapse=True, learn_tau=True, learn_beta=True, beta=0.5, key=key)


def _data(rng, scale=2.0):
    xs = jnp.asarray(scale * rng.standard_normal((LENGTH, INPUT)))
    return xs, jnp.asarray(rng.standard_normal((LENGTH, OUTPUT)))


def _online(algorithm, model, xs, targets, state=None):
    """The summed online gradient (through the trace path)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = model.init_state() if state is None else state
    trace = algorithm.init_trace(model, state, xs[0])
    step = eqtrace.make_online_step(algorithm, static)
    return eqtrace.online_gradient(
        step, squared_loss, params, state, trace, xs, targets, reduction="sum"
    )[1]


# (A rate cell with two state leaves, per-neuron and shared parameters under a leaky read-out
# is test_generated.py's `_LEAKY_READOUT`, where e-prop is also held to RTRL at the first step.)
@pytest.mark.parametrize("name", ["lif", "alif-learn"])
def test_equals_bptt_under_a_leaky_readout(name, getkey, rng):
    cell = _feed_forward(name, getkey())
    model = nn.Sequential([cell, nn.LeakyReadout(HIDDEN, OUTPUT, tau=4.0, key=getkey())])
    xs, targets = _data(rng)
    if name in ("lif", "alif-learn"):  # Spiking, not silent nor saturated.
        _, spikes = jax.lax.scan(lambda s, x: cell(s, x), cell.init_state(), xs)
        assert 0 < float(jnp.mean(spikes)) < 1
    online, bptt = online_and_bptt(eqtrace.EProp(), model, xs, targets)
    assert relative_error(online, bptt) <= 1e-9
    if name == "lif":
        # Not vacuous: per-layer D-RTRL drops the read-out's leak.
        drtrl = _online(eqtrace.DRTRL(), model, xs, targets)
        assert relative_error(drtrl, bptt) > 1e-2


def test_single_cell_with_readout_decay_equals_bptt(getkey, rng):
    # A lone cell whose leaky read-out is applied outside: `readout_decay` is its κ, and the
    # loss is the learning signal `L_t = (1 − κ) Wᵀ ∂L_t/∂y_t` (here from a forward pass)
    # contracted with the cell's output.
    cell = _feed_forward("lif", getkey())
    readout = nn.LeakyReadout(HIDDEN, OUTPUT, tau=4.0, key=getkey())
    model = nn.Sequential([cell, readout])
    xs, targets = _data(rng)
    _, ys = jax.lax.scan(lambda s, x: model(s, x), model.init_state(), xs)
    weight, kappa = readout.input_op.weight, readout.decay
    signals = jax.vmap(lambda y, t: (1 - kappa) * weight.T @ (2 * (y - t)))(ys, targets)

    algorithm = eqtrace.EProp(readout_decay=kappa)
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    state = cell.init_state()
    trace = algorithm.init_trace(cell, state)
    step = eqtrace.make_online_step(algorithm, static)
    _, online, _, _ = eqtrace.online_gradient(
        step,
        lambda z, signal: jnp.sum(z * signal),
        params,
        state,
        trace,
        xs,
        signals,
        reduction="sum",
    )
    model_params, model_static = eqx.partition(model, eqx.is_inexact_array)
    forward = eqtrace.make_forward_step(model_static)
    _, bptt, _ = eqtrace.bptt_gradient(
        forward, squared_loss, model_params, model.init_state(), xs, targets, reduction="sum"
    )
    assert relative_error(online, bptt.layers[0]) <= 1e-9


def test_equals_drtrl_without_a_leaky_readout(getkey, rng):
    # A leaky read-out's filter reaches only the cell just below it: not a cell under a
    # stateless read-out, nor under another cell, nor the read-out itself.
    model = nn.Sequential(
        [
            nn.LIF(INPUT, HIDDEN, recurrent=True, synapse=True, key=getkey()),
            nn.MinGRUCell(HIDDEN, HIDDEN, key=getkey()),
            eqx.nn.Linear(HIDDEN, OUTPUT, key=getkey()),
        ]
    )
    xs, targets = _data(rng)
    assert eqtrace.check(model, eqtrace.EProp()).layer_rules == (None, None, None)
    eprop = _online(eqtrace.EProp(), model, xs, targets)
    drtrl = _online(eqtrace.DRTRL(), model, xs, targets)
    assert relative_error(eprop, drtrl) == 0.0


def test_blocks_equal_steps_batched(getkey, rng):
    model = nn.Sequential(
        [
            nn.LIF(INPUT, HIDDEN, recurrent=True, learn_tau=True, key=getkey()),
            nn.LeakyReadout(HIDDEN, OUTPUT, tau=4.0, key=getkey()),
        ]
    )
    algorithm = eqtrace.EProp()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    xs = jnp.asarray(2 * rng.standard_normal((6, 2, INPUT)))
    targets = jnp.asarray(rng.standard_normal((6, 2, OUTPUT)))
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=2)
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    block = jax.vmap(
        eqtrace.make_online_block(algorithm, static), in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1)
    )
    by_step = eqtrace.online_gradient(
        step, squared_loss, params, state, trace, xs, targets, reduction="sum"
    )
    by_block = eqtrace.online_gradient(
        block, squared_loss, params, state, trace, xs, targets, block_size=4, reduction="sum"
    )
    assert relative_error(by_block[1], by_step[1]) <= 1e-12
    assert relative_error(by_block[2:], by_step[2:]) <= 1e-12  # final state and trace


def _leaky_readout_network(name, key):
    """A front (linear or a delay line), a cell and a leaky read-out."""
    k1, k2, k3 = jr.split(key, 3)
    readout = nn.LeakyReadout(HIDDEN, OUTPUT, tau=3.0, key=k3)
    if name == "gru":  # fused gates, behind a parameter-free front
        return nn.Sequential(
            [nn.DelayLine(INPUT, 2), nn.GRUCell(2 * INPUT, HIDDEN, key=k1), readout]
        )
    if name == "alif":  # three leaves, learnt adaptation
        cell = nn.ALIF(INPUT, HIDDEN, recurrent=True, learn_tau=True, learn_beta=True, key=k1)
        return nn.Sequential([cell, readout])
    # A user cell: two leaves, a per-neuron and a shared parameter.
    return nn.Sequential(
        [eqx.nn.Linear(INPUT, INPUT, key=k2), LeakyCurrent(INPUT, HIDDEN, key=k1), readout]
    )


def _steps_and_blocks(algorithm, model, xs, targets, loss_fn, block_size, outputs=False):
    """Stepping and blocks of `block_size` (the last one shorter if it does not divide the
    length): `online_gradient`'s loss, gradient, final state and trace; with `outputs`, also
    the outputs of `run_online` and of one block over the whole sequence."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = model.init_state()
    trace = algorithm.init_trace(model, state, xs[0])
    step = eqtrace.make_online_step(algorithm, static)
    block = eqtrace.make_online_block(algorithm, static)

    @jax.jit
    def run(params):
        stepped = eqtrace.online_gradient(
            step, loss_fn, params, state, trace, xs, targets, reduction="sum"
        )
        blocked = eqtrace.online_gradient(
            block,
            loss_fn,
            params,
            state,
            trace,
            xs,
            targets,
            block_size=block_size,
            reduction="sum",
        )
        if not outputs:
            return stepped, blocked
        stepped_ys, *_ = eqtrace.run_online(step, params, state, trace, xs)
        *_, blocked_ys = block(params, state, trace, xs)
        return (*stepped, stepped_ys), (*blocked, blocked_ys)

    return run(params)


def _assert_blocks_equal_steps(stepped, blocked):
    (loss, grads, state, trace, *ys) = stepped
    (block_loss, block_grads, block_state, block_trace, *block_ys) = blocked
    if ys:
        assert relative_error(block_ys, ys) <= 1e-12
    assert relative_error(block_loss, loss) <= 1e-12
    assert relative_error(block_state, state) <= 1e-12
    assert relative_error(block_trace, trace) <= 1e-10
    assert relative_error(block_grads, grads) <= 1e-10
    # Not vacuous: every parameter gets a gradient.
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


# ALIF (three leaves) under the long profile only: the user cell's two leaves already mix
# through a full 2×2 block per neuron.
@pytest.mark.parametrize("name", ["gru", "user", *(["alif"] if LONG else [])])
def test_blocks_equal_steps_under_a_leaky_readout(name, getkey, rng):
    """The filter's block form (one pass over the traces per block) against stepping: loss,
    online gradient (also into the layer below), final state and traces. (LIF:
    `test_blocks_equal_steps_batched`; a single step and a shorter last block:
    `test_single_cell_blocks_equal_steps`.)"""
    model = _leaky_readout_network(name, getkey())
    xs = jnp.asarray(2 * rng.standard_normal((6, INPUT)))
    targets = jnp.asarray(rng.standard_normal((6, OUTPUT)))
    stepped, blocked = _steps_and_blocks(eqtrace.EProp(), model, xs, targets, squared_loss, 3)
    _assert_blocks_equal_steps(stepped, blocked)
    # The filter is on, and its traces are compared.
    filtered = stepped[3][0 if name == "alif" else 1].ops
    assert all(bool(jnp.any(f != 0)) for f in jax.tree.leaves(filtered))


def test_single_cell_blocks_equal_steps(getkey, rng):
    """A lone cell with `readout_decay`, its outputs contracted with a learning signal, in
    blocks of 3 over 7 steps (the last block a single step, which is stepped); and the outputs
    themselves, stepped and in one block."""
    cell = nn.MinGRUCell(INPUT, HIDDEN, key=getkey())
    xs = jnp.asarray(rng.standard_normal((7, INPUT)))
    signals = jnp.asarray(rng.standard_normal((7, HIDDEN)))
    algorithm = eqtrace.EProp(readout_decay=0.7)
    stepped, blocked = _steps_and_blocks(
        algorithm, cell, xs, signals, lambda z, signal: jnp.sum(z * signal), 3, outputs=True
    )
    _assert_blocks_equal_steps(stepped, blocked)


def test_filtered_trace_by_hand(getkey, rng):
    # Feed-forward LIF neurons with a zero reset, v_t = α (1 − s_{t−1}) v_{t−1} + W x_t:
    # e_t = dv_t/dW = d_t e_{t−1} + x_t per neuron, ē_t = κ ē_{t−1} + H'(v_t) e_t, by hand.
    cell = _feed_forward("lif", getkey())
    model = nn.Sequential([cell, nn.LeakyReadout(HIDDEN, OUTPUT, tau=4.0, key=getkey())])
    algorithm = eqtrace.EProp()
    state = model.init_state()
    trace = algorithm.init_trace(model, state)
    step = eqx.filter_jit(algorithm.step)
    alpha, kappa = math.exp(-1 / 5), math.exp(-1 / 4)
    weight = np.asarray(cell.input_op.weight)
    slope = jax.vmap(jax.grad(lambda v: cell.output((v[None],))[0]))  # H' of the membrane

    v = s = np.zeros(HIDDEN)
    e = filtered = np.zeros((HIDDEN, INPUT))
    for x in np.asarray(_data(rng)[0][:4]):
        state, trace, _ = step(model, state, trace, jnp.asarray(x))
        # ∂v_t/∂v_{t−1} with the op output fixed: α (1 − s_{t−1}) − α v_{t−1} H'(v_{t−1}).
        d = alpha * (1 - s) - alpha * v * np.asarray(slope(jnp.asarray(v)))
        v, e = alpha * (1 - s) * v + weight @ x, d[:, None] * e + x[None]
        s = np.asarray(cell.output((jnp.asarray(v),)))
        filtered = kappa * filtered + np.asarray(slope(jnp.asarray(v)))[:, None] * e
        assert np.allclose(state[0][0], v)
        assert np.allclose(trace[0].eligibility.ops[0].weight[..., 0], e)
        assert np.allclose(trace[0].ops[0].weight, filtered)
    assert trace[1].ops is None  # The read-out's own trace is not filtered.


def test_check_reports_the_filter_and_its_memory(getkey):
    model = nn.Sequential(
        [nn.LIF(INPUT, HIDDEN, key=getkey()), nn.LeakyReadout(HIDDEN, OUTPUT, key=getkey())]
    )
    report = eqtrace.check(model, eqtrace.EProp())
    assert report.ok
    assert "EProp(readout_decay=" in str(report)
    # D-RTRL's traces plus one filtered copy of the LIF's input weights.
    drtrl = eqtrace.check(model, eqtrace.DRTRL())
    assert report.trace_floats == drtrl.trace_floats + HIDDEN * INPUT


class RolledOutput(eqtrace.AbstractCell):
    """A leaky layer whose output mixes neurons (`jnp.roll`): fine for D-RTRL, whose traces
    live on the state, but not filterable per neuron."""

    op: nn.Linear

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, HIDDEN, key=key)

    def init_state(self):
        return jnp.zeros(HIDDEN)

    def __call__(self, state, x):
        h = 0.5 * state + self.op(x)
        return h, self.output(h)

    def output(self, state):
        return jnp.roll(jnp.tanh(state), 1)


def test_refuses_an_output_it_cannot_filter(getkey):
    readout = nn.LeakyReadout(HIDDEN, OUTPUT, key=getkey())
    model = nn.Sequential([RolledOutput(key=getkey()), readout])
    x = jnp.zeros(INPUT)
    with pytest.raises(ValueError, match="output mixes neurons"):
        eqtrace.EProp().init_trace(model, model.init_state(), x)
    eqtrace.DRTRL().init_trace(model, model.init_state(), x)  # D-RTRL takes it.
    unfiltered = nn.Sequential(
        [RolledOutput(key=getkey()), eqx.nn.Linear(HIDDEN, OUTPUT, key=getkey())]
    )
    eqtrace.EProp().init_trace(unfiltered, unfiltered.init_state(), x)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_filters_the_output_of_a_16_bit_model(dtype, getkey, rng):
    """The check that the output is one value per neuron used to refuse a 16-bit LIF: its
    JVPs differ in the last bits (rounding), which it took for neurons mixing."""
    model64 = nn.Sequential(
        [_feed_forward("lif", getkey()), nn.LeakyReadout(HIDDEN, OUTPUT, tau=4.0, key=getkey())]
    )
    model = cast(model64, dtype)
    xs, targets = (a[:2] for a in _data(rng))
    online, _ = online_and_bptt(eqtrace.EProp(), model, xs.astype(dtype), targets.astype(dtype))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(online)} == {jnp.dtype(dtype)}
    reference = _online(eqtrace.EProp(), model64, xs, targets)
    assert relative_error(cast(online, jnp.float64), reference) <= 0.1
