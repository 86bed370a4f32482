"""SnAp-n against its oracles: n = 1 is SnAp-1 on cells with one state leaf per neuron; n at
the pattern's closure is RTRL (= BPTT); on an RNN with a banded recurrent mask, every n equals
a dense implementation of the definition (the full influence matrix, masked by the boolean
powers of the band), with the mask's size as the memory, growing with n. The registry runs
the generic oracles (first step = RTRL, blocks = steps, batch = loop, jit = no jit)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import eqtrace
from eqtrace import nn
from helpers import online_and_bptt, relative_error, squared_loss
from registry import make_cell


LENGTH, INPUT = 5, 3


def _sequence(key, model, length=LENGTH):
    k1, k2 = jr.split(key)
    size = model.output(model.init_state()).shape
    return jr.normal(k1, (length, INPUT)), jr.normal(k2, (length, *size))


@pytest.mark.parametrize("name", ["rnn", "gru"])
def test_n1_equals_snap1_with_one_state_leaf_per_neuron(name, getkey):
    # Both keep the immediate pattern (each weight's own neuron) and propagate it with the
    # diagonal of the full state Jacobian; SnAp-1 through its op structure, SnAp(1) through
    # the pattern read from the code.
    model = make_cell(name, getkey())
    xs, targets = _sequence(getkey(), model)
    general, bptt = online_and_bptt(eqtrace.SnAp(1), model, xs, targets)
    snap1, _ = online_and_bptt(eqtrace.SnAp1(), model, xs, targets)
    assert relative_error(general, snap1) <= 1e-12
    assert relative_error(general, bptt) > 1e-3  # not vacuous: not exact
    size = eqtrace.trace_size(eqtrace.SnAp(1), model).values
    assert size == eqtrace.SnAp(1).mask_size(model) == eqtrace.trace_size(eqtrace.SnAp1(), model)[0]


def test_n1_keeps_the_immediate_pattern_where_snap1_keeps_each_neurons_block(getkey):
    # An LSTM's output gate reaches only `h` at the first step; SnAp1 also keeps its `c`
    # entry (each neuron's 2×2 block), the paper's SnAp-1 does not.
    model = make_cell("lstm", getkey())
    hidden = model.init_state()[0].size
    output_gate = hidden * (INPUT + hidden + 1)
    snap1 = eqtrace.trace_size(eqtrace.SnAp1(), model).values
    assert eqtrace.SnAp(1).mask_size(model) == snap1 - output_gate


@pytest.mark.parametrize(
    "name, exact_from", [("rnn", 2), ("lstm", 2), ("alif-recurrent-learn-tau-beta", 3)]
)
def test_equals_rtrl_and_bptt_from_the_closure_on(name, exact_from, getkey):
    model = make_cell(name, getkey())
    xs, targets = _sequence(getkey(), model)
    rtrl, bptt = online_and_bptt(eqtrace.RTRL(), model, xs, targets)
    below, _ = online_and_bptt(eqtrace.SnAp(exact_from - 1), model, xs, targets)
    at, _ = online_and_bptt(eqtrace.SnAp(exact_from), model, xs, targets)
    assert relative_error(below, bptt) > 1e-8
    assert relative_error(at, rtrl) <= 1e-12 and relative_error(at, bptt) <= 1e-12
    notes = eqtrace.check(model, eqtrace.SnAp(exact_from - 1)).notes
    assert any(f"from n = {exact_from} on" in note for note in notes)
    notes = eqtrace.check(model, eqtrace.SnAp(exact_from)).notes
    assert any("equals exact RTRL" in note for note in notes)


HIDDEN, BAND = 7, 1


class BandedRNN(eqtrace.AbstractCell):
    """`h' = tanh(W_in x + (W ⊙ B) h + b)` with a banded recurrent mask `B` (`|i − j| ≤ 1`)."""

    input_op: nn.Linear
    recurrent_op: nn.Linear
    input_size: int = eqx.field(static=True, default=INPUT)

    def __init__(self, *, key):
        k1, k2 = jr.split(key)
        band = jnp.abs(jnp.subtract(*jnp.meshgrid(jnp.arange(HIDDEN), jnp.arange(HIDDEN)))) <= BAND
        self.input_op = nn.Linear(INPUT, HIDDEN, key=k1)
        self.recurrent_op = nn.Linear(HIDDEN, HIDDEN, use_bias=False, mask=band, key=k2)

    def init_state(self):
        return jnp.zeros(HIDDEN)

    def __call__(self, state, x):
        h = jnp.tanh(self.input_op(x) + self.recurrent_op(state))
        return h, h


def _definition_mask(model, n):
    """`P_n = pattern(Σ_{k<n} B̄ᵏ Ī)` for `BandedRNN`, written out by hand: each of neuron
    `i`'s weights and bias reaches `h_i` at once (a masked-out weight nothing), then
    spreads along the band."""
    band = np.asarray(model.recurrent_op.mask)
    params = eqx.filter(model, eqx.is_inexact_array)
    rows = np.arange(HIDDEN)
    owner = jax.tree.map(
        lambda a: np.broadcast_to(rows.reshape(-1, *[1] * (a.ndim - 1)), a.shape), params
    )
    owner = eqx.tree_at(lambda p: p.recurrent_op.weight, owner, np.where(band, rows[:, None], -1))
    flat_owner = ravel_pytree(jax.tree.map(np.asarray, owner))[0].astype(int)
    immediate = flat_owner[None, :] == np.arange(HIDDEN)[:, None]
    mask = reach = immediate
    for _ in range(n - 1):
        reach = (band.astype(int) @ reach.astype(int)) > 0
        mask = mask | reach
    return mask


def _definition_gradient(model, xs, targets, mask):
    """The online gradient of `M_t = P ⊙ (J_t M_{t-1} + I_t)` with the dense influence
    matrix, `Σ_t M_tᵀ ∂L_t/∂h_t`, in plain JAX."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    theta, unravel = ravel_pytree(params)

    def transition(h, theta, x):
        return eqx.combine(unravel(theta), static)(h, x)[0]

    @jax.jit
    def step(carry, inputs):
        h, influence, gradient = carry
        x, target = inputs
        jac_h, jac_theta = jax.jacrev(transition, argnums=(0, 1))(h, theta, x)
        influence = jnp.where(mask, jac_h @ influence + jac_theta, 0)
        h = transition(h, theta, x)
        return h, influence, gradient + influence.T @ jax.grad(squared_loss)(h, target)

    carry = (model.init_state(), jnp.zeros((HIDDEN, theta.size)), jnp.zeros(theta.size))
    for inputs in zip(xs, targets):
        carry = step(carry, inputs)
    return unravel(carry[2])


def test_banded_mask_every_n_against_the_definition(getkey):
    model = BandedRNN(key=getkey())
    xs, targets = _sequence(getkey(), model)
    sizes = []
    for n in range(1, 5):
        mask = _definition_mask(model, n)
        online, bptt = online_and_bptt(eqtrace.SnAp(n), model, xs, targets)
        reference = _definition_gradient(model, xs, targets, mask)
        assert relative_error(online, reference) <= 1e-12, n
        assert relative_error(online, bptt) > 1e-6, n  # the band has not closed by n = 4
        assert eqtrace.SnAp(n).mask_size(model) == mask.sum()
        sizes.append(eqtrace.trace_size(eqtrace.SnAp(n), model).values)
        # Masked-out weights get no gradient; every other parameter one.
        band = np.asarray(model.recurrent_op.mask)
        assert np.all((np.asarray(online.recurrent_op.weight) != 0) == band)
    # Memory falls with smaller n, and stays below RTRL's.
    rtrl = eqtrace.trace_size(eqtrace.RTRL(), model).values
    assert sizes == sorted(set(sizes)) and sizes[-1] < rtrl


def test_blocks_and_batches_on_the_banded_mask(getkey):
    # Bucket padding (edge neurons reach fewer states) through the block path, batched.
    model = BandedRNN(key=getkey())
    rule = eqtrace.SnAp(3)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    xs = jr.normal(getkey(), (2, 3, INPUT))
    plan = eqtrace.prepare(rule, model, xs[0, 0])
    state = jnp.zeros((2, HIDDEN))
    trace = jax.vmap(lambda s: rule.init_trace(model, s, plan=plan))(state)
    block = eqtrace.make_online_block(rule, static, plan=plan)
    step = eqtrace.make_online_step(rule, static, plan=plan)

    def by_blocks(p):
        return jnp.sum(jax.vmap(block, (None, 0, 0, 0))(p, state, trace, xs)[2] ** 2)

    def by_steps(p):
        s, tr, total = state, trace, 0.0
        for t in range(3):
            s, tr, y = jax.vmap(step, (None, 0, 0, 0))(p, s, tr, xs[:, t])
            total = total + jnp.sum(y**2)
        return total

    assert relative_error(jax.grad(by_blocks)(params), jax.grad(by_steps)(params)) <= 1e-12


@pytest.mark.parametrize("n", [0, -1, True])
def test_n_must_be_a_positive_integer(n):
    with pytest.raises(ValueError, match="`n` must be an integer ≥ 1"):
        eqtrace.SnAp(n)


class Untraceable(eqtrace.AbstractCell):
    """A `while_loop` in its step: reverse mode cannot differentiate it."""

    op: nn.Linear

    def __init__(self, *, key):
        self.op = nn.Linear(INPUT, 4, key=key)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        def body(carry):
            i, h = carry
            return i + 1, jnp.tanh(h)

        _, h = jax.lax.while_loop(lambda c: c[0] < 2, body, (0, state + self.op(x)))
        return h, h


def test_a_cell_without_a_pattern_is_refused(getkey):
    cell, x = Untraceable(key=getkey()), jnp.zeros(INPUT)
    with pytest.raises(eqtrace.StructureError, match="SnAp cannot read the dependency pattern"):
        eqtrace.SnAp().init_trace(cell, cell.init_state(), x)
    assert eqtrace.check(cell, eqtrace.SnAp(), x=x).refusal is not None
