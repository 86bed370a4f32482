"""SnAp-1 against its oracles: RTRL and BPTT where the recurrence is diagonal (a recurrent op
masked to its diagonal), where D-RTRL is not exact; SnAp-1 as Menick et al. define it (RTRL
with the trace kept on its one-step sparsity pattern) on cells with full recurrent weights;
the restricted op derivative against its definition. The registry runs the rest (first step
= RTRL on every cell, blocks = steps, exact on element-wise layers)."""

import os

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, settings
from jax.flatten_util import ravel_pytree

import eqtrace
from eqtrace import nn
from eqtrace._ops import algebra
from helpers import online_in_blocks, relative_error, squared_loss
from registry import make_cell


LENGTH, INPUT, HIDDEN = 6, 3, 4


def _diagonal(cell):
    """`cell` with its recurrent op masked to its diagonal (each gate's block)."""
    op = cell.recurrent_op
    mask = jnp.tile(jnp.eye(op.in_features, dtype=bool), (op.out_features // op.in_features, 1))
    op = eqx.tree_at(lambda o: o.mask, op, mask, is_leaf=lambda node: node is None)
    op = eqx.tree_at(lambda o: o.weight, op, jnp.where(mask, op.weight, 0))
    return eqx.tree_at(lambda c: c.recurrent_op, cell, op)


DIAGONAL = {
    "gru": lambda key: _diagonal(nn.GRUCell(INPUT, HIDDEN, key=key)),
    "lif": lambda key: nn.LIF(
        INPUT,
        HIDDEN,
        recurrent=True,
        synapse=True,
        recurrent_mask=jnp.eye(HIDDEN, dtype=bool),
        key=key,
    ),
}


def _online(algorithm, model, xs, targets, state=None):
    """The summed per-step online gradient (through the trace path)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = model.init_state() if state is None else state
    trace = algorithm.init_trace(model, state, xs[0])
    step = eqtrace.make_online_step(algorithm, static)
    return eqtrace.online_gradient(
        step, squared_loss, params, state, trace, xs, targets, reduction="sum"
    )[1]


def _bptt(model, xs, targets):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    step = eqtrace.make_forward_step(static)
    return eqtrace.bptt_gradient(
        step, squared_loss, params, model.init_state(), xs, targets, reduction="sum"
    )[1]


def _sequence(key, scale=1.0):
    xkey, tkey = jr.split(key)
    return scale * jr.normal(xkey, (LENGTH, INPUT)), jr.normal(tkey, (LENGTH, HIDDEN))


@pytest.mark.parametrize("name", list(DIAGONAL))
def test_equals_rtrl_and_bptt_on_a_diagonal_recurrence(name, getkey):
    model = DIAGONAL[name](getkey())
    xs, targets = _sequence(getkey(), 3.0 if name == "lif" else 1.0)
    bptt = _bptt(model, xs, targets)
    assert relative_error(_online(eqtrace.SnAp1(), model, xs, targets), bptt) <= 1e-9
    # Not vacuous: the self-paths through the diagonal recurrent weights matter.
    assert relative_error(_online(eqtrace.DRTRL(), model, xs, targets), bptt) > 1e-3
    if name == "gru":  # RTRL equals BPTT on every cell (test_foundation.py); here too.
        assert relative_error(_online(eqtrace.RTRL(), model, xs, targets), bptt) <= 1e-9


def test_blocks_equal_bptt_on_a_diagonal_recurrence(getkey):
    model = DIAGONAL["gru"](getkey())
    xs, targets = _sequence(getkey())
    _, blocks, _, _ = online_in_blocks(
        eqtrace.SnAp1(),
        model,
        xs,
        targets,
        block_size=4,  # and a remainder of 2
    )
    assert relative_error(blocks, _bptt(model, xs, targets)) <= 1e-9


class GatedDiagonal(eqtrace.AbstractCell):
    """`h' = tanh(U x + W_diag relu(h))`: each input of the recurrent op depends on its neuron
    only where the ReLU is active, about half the random draws of the analysis (three draws
    left some inputs without an owner, and SnAp-1 dropped their self-paths)."""

    inp: eqx.nn.Linear
    rec: nn.Linear

    def __init__(self, input_size, hidden_size, *, key):
        ikey, rkey = jr.split(key)
        self.inp = eqx.nn.Linear(input_size, hidden_size, key=ikey)
        mask = jnp.eye(hidden_size, dtype=bool)
        self.rec = nn.Linear(hidden_size, hidden_size, mask=mask, key=rkey)

    def init_state(self):
        return jnp.zeros(self.rec.out_features)

    def __call__(self, state, x):
        h = jnp.tanh(self.inp(x) + self.rec(jax.nn.relu(state)))
        return h, h


def test_equals_bptt_on_a_gated_diagonal_recurrence(getkey):
    model = GatedDiagonal(2, 6, key=getkey())
    xs, targets = jr.normal(getkey(), (LENGTH, 2)), jr.normal(getkey(), (LENGTH, 6))
    assert (
        relative_error(_online(eqtrace.SnAp1(), model, xs, targets), _bptt(model, xs, targets))
        <= 1e-9
    )


def _by_definition(model, xs, targets):
    """SnAp-1 as Menick et al. (2021) define it: exact RTRL, `M_t = P ⊙ (J^h_t M_{t-1} +
    J^θ_t)`, with `M` kept on the pattern `P` of the neurons each parameter reaches in one
    step; the online gradient is `Σ_t ∂L_t/∂h_t · M_t`."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat_params, unravel_params = ravel_pytree(params)
    state = model.init_state()
    flat_state, unravel_state = ravel_pytree(state)

    def step(p, h, x):
        new, _ = eqx.combine(unravel_params(p), static)(unravel_state(h), x)
        return ravel_pytree(new)[0]

    def loss(h, target):
        return squared_loss(model.output(unravel_state(h)), target)

    @jax.jit
    def jacobians(h, x):
        return step(flat_params, h, x), jax.jacfwd(step, (0, 1))(flat_params, h, x)

    h, steps = flat_state, []
    for x in xs:
        new, (jac_params, jac_state) = jacobians(h, x)
        steps.append((new, jac_params, jac_state))
        h = new
    neuron = np.arange(flat_state.size) % HIDDEN
    reaches = np.zeros((HIDDEN, flat_params.size), bool)  # neuron n, parameter w
    for _, jac_params, _ in steps:
        np.logical_or.at(reaches, neuron, np.asarray(jac_params) != 0)
    pattern = jnp.asarray(reaches[neuron])
    trace, gradient = jnp.zeros((flat_state.size, flat_params.size)), 0
    for (new, jac_params, jac_state), target in zip(steps, targets):
        trace = jnp.where(pattern, jac_state @ trace + jac_params, 0)
        gradient = gradient + jax.grad(loss)(new, target) @ trace
    return unravel_params(gradient)


# With full recurrent weights; several state leaves and per-neuron parameters.
@pytest.mark.parametrize("name", ["gru", "alif-recurrent-learn-tau-beta"])
def test_equals_snap1_as_defined_with_full_recurrent_weights(name, getkey):
    model = make_cell(name, getkey(), INPUT, HIDDEN)
    xs, targets = _sequence(getkey(), 3.0 if name.startswith("alif") else 1.0)
    defined = _by_definition(model, xs, targets)
    assert relative_error(_online(eqtrace.SnAp1(), model, xs, targets), defined) <= 1e-9
    if name == "gru":  # Each neuron's own recurrent path matters.
        assert relative_error(_online(eqtrace.DRTRL(), model, xs, targets), defined) > 1e-4


# Fixed sizes: each example reuses the compiled kernels of the first.
_INPUT_OWNERS = st.lists(st.integers(-1, 2), min_size=5, max_size=5)
_OUTPUT_OWNERS = st.lists(st.integers(0, 2), min_size=4, max_size=4)


@settings(
    max_examples=400 if os.environ.get("EQTRACE_HYPOTHESIS_PROFILE") == "long" else 5,
    deadline=None,
    derandomize=True,
    database=None,
)
@given(
    input_owners=_INPUT_OWNERS,
    output_owners=_OUTPUT_OWNERS,
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_restricted_op_derivative(input_owners, output_owners, masked, seed):
    # `δu_j = Σ_i W[j, i] δa_i` over the inputs `i` of output `j`'s own neuron, for the
    # dense op's gather and the default derived by automatic differentiation.
    keys = jr.split(jr.key(seed), 4)
    i, o = len(input_owners), len(output_owners)
    mask = jr.bernoulli(keys[0], 0.6, (o, i)) if masked else None
    op = nn.Linear(i, o, mask=mask, key=keys[1])
    a, tangent = jr.normal(keys[2], (i,)), jr.normal(keys[3], (i,))
    in_owners, out_owners = np.array(input_owners), np.array(output_owners)
    weight = op.weight if mask is None else jnp.where(mask, op.weight, 0)
    same = (out_owners[:, None] == in_owners[None, :]) & (in_owners[None, :] >= 0)
    expected = jnp.where(same, weight, 0) @ tangent
    for rules in (algebra(op), eqtrace.OpAlgebra()):
        got = rules.restricted(op, a, tangent, in_owners, out_owners)
        assert got.shape == (o,)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


class Normalised(eqtrace.AbstractCell):
    """Its recurrent op reads a normalised state: every input element depends on every
    neuron, so no op input carries a self-path."""

    input_op: nn.Linear
    recurrent_op: nn.Linear
    input_size: int = eqx.field(static=True)

    def __init__(self, *, key):
        ikey, rkey = jr.split(key)
        self.input_op = nn.Linear(INPUT, HIDDEN, key=ikey)
        self.recurrent_op = nn.Linear(HIDDEN, HIDDEN, key=rkey)
        self.input_size = INPUT

    def init_state(self):
        return jnp.zeros(HIDDEN)

    def __call__(self, state, x):
        a = state / (1 + jnp.sum(state**2))
        h = jnp.tanh(self.input_op(x) + self.recurrent_op(a))
        return h, h


def test_op_inputs_of_several_neurons(getkey):
    model = Normalised(key=getkey())
    with pytest.raises(ValueError, match="depend on several neurons' states"):
        eqtrace.SnAp1().init_trace(model, model.init_state())
    report = eqtrace.check(model, eqtrace.SnAp1())
    assert report.refusal is not None and "strict=False" in report.refusal
    assert any("4 depend on several neurons" in note for note in report.notes)
    # With `strict=False` those paths are cut, as in D-RTRL: the same rule here.
    xs, targets = _sequence(getkey())
    state = jtu.tree_map(lambda s: jr.normal(getkey(), s.shape), model.init_state())
    snap = _online(eqtrace.SnAp1(strict=False), model, xs, targets, state)
    assert relative_error(snap, _online(eqtrace.DRTRL(), model, xs, targets, state)) <= 1e-12


def test_check_reports_the_self_paths(getkey):
    report = eqtrace.check(nn.GRUCell(INPUT, HIDDEN, key=getkey()), eqtrace.SnAp1())
    assert report.ok
    # In plain words: no self-path through an op fed by the input, the neurons' own weights
    # through a recurrent op.
    assert any(
        "`.recurrent_op`: 4 of its 4 input elements each depend on one neuron's state" in n
        for n in report.notes
    )
    assert any(
        "adds no self-path through `.input_op`: none of its 3 input elements depends on a "
        "neuron's state" in n
        for n in report.notes
    )
    assert "self-paths" in str(report)
    # Same memory as D-RTRL.
    assert (
        report.trace_floats == eqtrace.check(nn.GRUCell(INPUT, HIDDEN, key=getkey())).trace_floats
    )
