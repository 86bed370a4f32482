"""OTTT against its oracles: the paper's update written naively (a loop over time with its
equations) on two LIF layers; BPTT where the paper says they agree (one feed-forward layer,
reset detached, a linear read-out and a loss at each step); D-RTRL, which it equals on every
cell it accepts; and, for each rule of `registry.SPECIALISED` (OTTT, OTPE) on its cells, the
oracles that hold for every rule (RTRL at the first step, blocks = steps, batch = loop,
jit = no jit). Its refusals name what the leak depends on."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import eqtrace
from eqtrace import nn
from helpers import (
    LONG,
    online_and_bptt,
    online_in_blocks,
    online_only,
    random_state,
    relative_error,
    squared_loss,
)
from registry import SPECIALISED, make_cell


INPUT, HIDDEN, OUTPUT, LENGTH = 3, 4, 2, 6
#: Each rule on each cell it accepts under `LONG`, on its first by default.
CASES = [
    pytest.param(case, cell, id=f"{case.name}-{cell}")
    for case in SPECIALISED
    for cell in (case.cells if LONG else case.cells[:1])
]


def _data(key, length=LENGTH, scale=2.0):
    kx, kt = jr.split(key)
    return scale * jr.normal(kx, (length, INPUT)), jr.normal(kt, (length, OUTPUT))


def _naive_ottt(model, xs, targets):
    """Xiao et al.'s OTTT on `LIF → LIF → Linear`, written out: per step, the instantaneous
    loss's cotangents of the membranes (through the layers above, at this step only) times
    the presynaptic traces `â_t = λ â_{t-1} + a_t`, summed over the steps."""
    lif1, lif2, readout = model.layers

    def spike(cell, v):
        return cell.surrogate((v - cell.threshold) / cell.threshold)

    lam1, lam2 = (math.exp(-c.dt / c.tau_mem) for c in (lif1, lif2))
    w1, w2 = lif1.input_op.weight, lif2.input_op.weight

    def step(carry, inputs):
        v1, v2, a1, a2, grads = carry
        x, target = inputs
        # The forward step (reset by the previous spikes, subtracting the threshold).
        v1 = lam1 * v1 - lif1.threshold * spike(lif1, v1) + w1 @ x
        base2 = lam2 * v2 - lif2.threshold * spike(lif2, v2)
        s1 = spike(lif1, v1)
        v2 = base2 + w2 @ s1

        def loss(v2, wo, bo):
            return squared_loss(wo @ spike(lif2, v2) + bo, target)

        g2, gwo, gbo = jax.grad(loss, argnums=(0, 1, 2))(v2, readout.weight, readout.bias)
        # `∂L_t/∂v1_t` through this step's spikes and the layer above (no time).
        _, pull = jax.vjp(lambda v: base2 + w2 @ spike(lif1, v), v1)
        (g1,) = pull(g2)
        a1 = lam1 * a1 + x  # the presynaptic traces
        a2 = lam2 * a2 + s1
        updates = {"w1": jnp.outer(g1, a1), "w2": jnp.outer(g2, a2), "wo": gwo, "bo": gbo}
        grads = jtu.tree_map(jnp.add, grads, updates)
        return (v1, v2, a1, a2, grads), None

    zeros = {
        "w1": jnp.zeros_like(w1),
        "w2": jnp.zeros_like(w2),
        "wo": jnp.zeros_like(readout.weight),
        "bo": jnp.zeros_like(readout.bias),
    }
    init = (jnp.zeros(HIDDEN), jnp.zeros(HIDDEN), jnp.zeros(INPUT), jnp.zeros(HIDDEN), zeros)
    (*_, grads), _ = jax.lax.scan(step, init, (xs, targets))
    return grads


def test_equals_the_papers_update_written_naively(getkey):
    def lif(i):
        return nn.LIF(i, HIDDEN, tau_mem=5.0, detach_reset=True, key=getkey())

    model = nn.Sequential([lif(INPUT), lif(HIDDEN), eqx.nn.Linear(HIDDEN, OUTPUT, key=getkey())])
    xs, targets = _data(getkey())
    online = online_only(eqtrace.OTTT(), model, xs, targets)
    naive = _naive_ottt(model, xs, targets)
    got = {
        "w1": online.layers[0].input_op.weight,
        "w2": online.layers[1].input_op.weight,
        "wo": online.layers[2].weight,
        "bo": online.layers[2].bias,
    }
    assert relative_error(got, naive) <= 1e-12
    # Not vacuous: the first layer spikes, and both layers' weights get a gradient.
    _, spikes = jax.lax.scan(lambda s, x: model.layers[0](s, x), model.layers[0].init_state(), xs)
    assert 0 < float(jnp.mean(spikes)) < 1
    assert all(float(jnp.max(jnp.abs(got[w]))) > 0 for w in ("w1", "w2", "bo"))


@pytest.mark.parametrize("synapse", [False, True])
def test_equals_bptt_for_one_layer_under_a_linear_readout(synapse, getkey):
    """The paper's claim: with the reset detached (in BPTT too) and a loss at each step
    through a linear read-out, OTTT's summed updates are BPTT's for the layer below the
    read-out (here the only one). Exact with a synapse as well (a second constant leak)."""
    key, readout = getkey(), eqx.nn.Linear(HIDDEN, OUTPUT, key=getkey())

    def model(detach_reset):
        cell = nn.LIF(
            INPUT, HIDDEN, tau_mem=5.0, synapse=synapse, detach_reset=detach_reset, key=key
        )
        return nn.Sequential([cell, readout])

    xs, targets = _data(getkey())
    online, bptt = online_and_bptt(eqtrace.OTTT(), model(True), xs, targets)
    assert relative_error(online, bptt) <= 1e-12
    # Not vacuous: with the reset differentiated, BPTT's gradient is another one.
    _, bptt_attached = online_and_bptt(eqtrace.RTRL(), model(False), xs, targets)
    assert relative_error(bptt_attached, bptt) > 1e-3


def test_not_bptt_below_another_layer(getkey):
    """Two layers: OTTT drops the paths through the upper layer's leak, as the paper says."""
    model = nn.Sequential(
        [
            nn.LIF(INPUT, HIDDEN, tau_mem=5.0, detach_reset=True, key=getkey()),
            nn.LIF(HIDDEN, HIDDEN, tau_mem=5.0, detach_reset=True, key=getkey()),
            eqx.nn.Linear(HIDDEN, OUTPUT, key=getkey()),
        ]
    )
    online, bptt = online_and_bptt(eqtrace.OTTT(), model, *_data(getkey()))
    assert relative_error(online.layers[0], bptt.layers[0]) > 1e-3
    assert relative_error(online.layers[1:], bptt.layers[1:]) <= 1e-12


@pytest.mark.parametrize("case, cell", CASES)
def test_its_rule_first_step_blocks_batch_and_jit_on_its_cells(case, cell, getkey):
    """On each cell it accepts: its `same_as` rule's gradient exactly, with a smaller trace
    (for a rule that has one); RTRL's at the first step from a random state; blocks = steps;
    a vmapped batch = the sum over samples; jit = no jit."""
    model = nn.Sequential(
        [make_cell(cell, getkey(), INPUT, HIDDEN), eqx.nn.Linear(HIDDEN, OUTPUT, key=getkey())]
    )
    rule = case.algorithm
    batch = 2
    xs = 2 * jr.normal(getkey(), (LENGTH, batch, INPUT))
    targets = jr.normal(getkey(), (LENGTH, batch, OUTPUT))
    stepped = online_only(rule, model, xs[:, 0], targets[:, 0])
    assert all(bool(jnp.any(g != 0)) for g in jtu.tree_leaves(stepped))
    if case.same_as is not None:
        same_as = dict(drtrl=eqtrace.DRTRL())[case.same_as]
        same = online_only(same_as, model, xs[:, 0], targets[:, 0])
        assert relative_error(stepped, same) <= 1e-12
        assert eqtrace.trace_size(rule, model).values < eqtrace.trace_size(same_as, model).values
    state = random_state(np.random.default_rng(0), model)
    rules = (rule, eqtrace.RTRL())
    first = [online_only(r, model, xs[:1, 0], targets[:1, 0], state) for r in rules]
    assert relative_error(*first) <= 1e-12
    _, blocked, _, _ = online_in_blocks(rule, model, xs[:, 0], targets[:, 0], block_size=4)
    assert relative_error(blocked, stepped) <= 1e-12

    params, static = eqx.partition(model, eqx.is_inexact_array)
    step = jax.vmap(eqtrace.make_online_step(rule, static), in_axes=(None, 0, 0, 0))
    state, trace = eqtrace.init_state_and_trace(model, rule, batch)

    def run(step):
        return eqtrace.online_gradient(
            step, squared_loss, params, state, trace, xs, targets, reduction="sum"
        )[1]

    batched = run(step)
    second = online_only(rule, model, xs[:, 1], targets[:, 1])
    assert relative_error(batched, jtu.tree_map(jnp.add, stepped, second)) <= 1e-12
    assert relative_error(run(jax.jit(step)), batched) <= 1e-12


REFUSED = {
    "reset differentiated": (lambda key: nn.LIF(INPUT, HIDDEN, key=key), "`state[0]`"),
    "reset to zero": (
        lambda key: nn.LIF(INPUT, HIDDEN, reset="zero", detach_reset=True, key=key),
        "`state[0]`",
    ),
    "learnt time constant": (
        lambda key: nn.LIF(INPUT, HIDDEN, learn_tau=True, detach_reset=True, key=key),
        "`.log_tau_mem`",
    ),
    "gated": (lambda key: nn.GRUCell(INPUT, HIDDEN, key=key), "the input `x`"),
    "adaptive threshold": (lambda key: nn.ALIF(INPUT, HIDDEN, key=key), "`state[1]`"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refuses_cells_without_a_constant_leak(name, getkey):
    make, subject = REFUSED[name]
    cell = make(getkey())
    x = jnp.zeros(INPUT)
    with pytest.raises(eqtrace.StructureError, match="OTTT cannot trace") as error:
        eqtrace.OTTT().init_trace(cell, cell.init_state(), x)
    assert subject in str(error.value) and "detach_reset=True" in str(error.value)
    if name == "reset differentiated":
        assert eqtrace.check(cell, eqtrace.OTTT(), x=x).refusal == str(error.value)
        # `strict=False` accepts broken diagonal assumptions, never a leak the trace cannot
        # hold.
        with pytest.raises(eqtrace.StructureError, match="OTTT cannot trace"):
            eqtrace.OTTT(strict=False).init_trace(cell, cell.init_state(), x)


def test_per_neuron_leaks_are_refused():
    """A fixed leak that differs across neurons (a constant per-neuron time constant) cannot
    decay one presynaptic trace shared by the neurons."""

    class Leaky(eqtrace.AbstractCell):
        op: nn.Linear
        decay: tuple[float, ...] = eqx.field(static=True)

        def __init__(self, decay, key):
            self.op = nn.Linear(INPUT, HIDDEN, key=key)
            self.decay = tuple(float(d) for d in decay)

        def init_state(self):
            return jnp.zeros(HIDDEN)

        def __call__(self, state, x):
            v = jnp.asarray(self.decay, state.dtype) * state + self.op(x)
            return v, jnp.tanh(v)

        def output(self, state):
            return jnp.tanh(state)

    cell = Leaky(np.linspace(0.5, 0.9, HIDDEN), jr.key(0))
    with pytest.raises(eqtrace.StructureError, match="differs across the neurons"):
        eqtrace.OTTT().init_trace(cell, cell.init_state(), jnp.zeros(INPUT))
    # The same cell with one leak for all neurons is accepted and equals BPTT.
    uniform = Leaky([0.8] * HIDDEN, jr.key(0))
    xs, targets = jr.normal(jr.key(1), (LENGTH, INPUT)), jr.normal(jr.key(2), (LENGTH, HIDDEN))
    online, bptt = online_and_bptt(eqtrace.OTTT(), uniform, xs, targets)
    assert relative_error(online, bptt) <= 1e-12
