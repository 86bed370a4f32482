"""The inexact rules of the registry (D-RTRL, pp-prop) against their oracles: BPTT where exact,
RTRL at T = 1, and the defining recurrences on a hand-computable case. Rules are paired with
cells (`helpers.pairs`); `EQTRACE_HYPOTHESIS_PROFILE=long` runs every pair."""

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
    ConvCell,
    LeakyCurrent,
    LeakyTanh,
    Rolling,
    TokenCell,
    cast,
    online_and_bptt,
    pairs,
    relative_error,
    squared_loss,
)
from registry import CELLS, EVERY_CELL, algorithm_cases, algorithms, cells, make_cell, rules


#: Rules that equal RTRL at T = 1 (exact rules are held to BPTT instead, a stronger oracle).
FIRST_STEP = algorithms(equals_rtrl_at_first_step=True, exact=False, first_step_as=None)
#: Rules exact on an element-wise layer but not on any cell.
EXACT_ELEMENTWISE = algorithms(exact_elementwise=True, exact=False)
#: Oracles that hold for every rule (batch = loop, jit = no jit, a gradient for every
#: parameter) run here for the inexact rules; test_foundation.py and test_cells.py run them
#: for the exact ones, together with BPTT.
INEXACT = algorithms(exact=False)
#: The batch and jit oracles below split the inexact rules between them by default (every rule
#: gets both under `LONG`); test_any_cell.py holds `jit(vmap(step))` to the eager gradient for
#: one rule per kind of trace and every rule with its own blocks.
BATCH_RULES, JIT_RULES = (INEXACT, INEXACT) if LONG else (INEXACT[0::2], INEXACT[1::2])


def _sequence(key, length, input_size, output_size):
    xkey, tkey = jr.split(key)
    return jr.normal(xkey, (length, input_size)), jr.normal(tkey, (length, output_size))


# The test cells, and the element-wise built-in cells of `EVERY_CELL`.
ELEMENTWISE_CELLS = cells(["leaky-tanh", "leaky-current", *EVERY_CELL], elementwise=True)


@pytest.mark.parametrize("name, algorithm", pairs(ELEMENTWISE_CELLS, EXACT_ELEMENTWISE))
def test_equals_bptt_for_elementwise_layer(name, algorithm, getkey):
    model = nn.Sequential([make_cell(name, getkey(), 3, 4), eqx.nn.Linear(4, 2, key=getkey())])
    xs, targets = _sequence(getkey(), 7, 3, 2)
    if CELLS[name].spiking:
        xs = 3 * xs  # strong enough to spike
        cell = model.layers[0]
        _, ys = jax.lax.scan(lambda s, x: cell(s, x), cell.init_state(), xs)
        assert 0 < float(jnp.mean(ys)) < 1
    online, bptt = online_and_bptt(algorithm, model, xs, targets)
    assert relative_error(online, bptt) <= 1e-9


@pytest.mark.parametrize("algorithm", EXACT_ELEMENTWISE)
def test_not_exact_with_recurrent_weights(algorithm, getkey):
    # The oracle above is not vacuous: with recurrent weights D-RTRL drops paths.
    model = nn.RNNCell(3, 4, key=getkey())
    xs, targets = _sequence(getkey(), 7, 3, 4)
    online, bptt = online_and_bptt(algorithm, model, xs, targets)
    assert relative_error(online, bptt) > 1e-3


# And pp-prop built from a rank rather than a decay.
@pytest.mark.parametrize(
    "cell_cls, algorithm",
    pairs(
        [nn.RNNCell, nn.GRUCell, LeakyCurrent],
        [*FIRST_STEP, pytest.param(eqtrace.PPProp(rank=3), id="ppprop-rank")],
    ),
)
def test_equals_rtrl_at_first_step(cell_cls, algorithm, getkey):
    model = cell_cls(3, 4, key=getkey())
    state = jtu.tree_map(lambda s: jr.normal(getkey(), s.shape), model.init_state())
    xs, targets = _sequence(getkey(), 1, 3, 4)
    online, _ = online_and_bptt(algorithm, model, xs, targets, state=state)
    exact, _ = online_and_bptt(eqtrace.RTRL(), model, xs, targets, state=state)
    assert relative_error(online, exact) <= 1e-12


@pytest.mark.parametrize("algorithm", FIRST_STEP)
def test_two_layer_network_first_step_equals_rtrl(algorithm, getkey):
    # At T = 1, layer-wise traces with exact spatial credit are exact. From a random state,
    # so that the recurrent weights' gradients are not zero on both sides.
    model = nn.Sequential(
        [
            nn.GRUCell(3, 4, key=getkey()),
            nn.RNNCell(4, 5, key=getkey()),
            eqx.nn.Linear(5, 2, key=getkey()),
        ]
    )
    state = jtu.tree_map(lambda s: jr.normal(getkey(), s.shape), model.init_state())
    xs, targets = _sequence(getkey(), 1, 3, 2)
    online, _ = online_and_bptt(algorithm, model, xs, targets, state=state)
    exact, _ = online_and_bptt(eqtrace.RTRL(), model, xs, targets, state=state)
    assert relative_error(online, exact) <= 1e-12


class Affine(eqtrace.AbstractCell):
    """`h' = λ ⊙ h + W x + b`: `D = λ`, `∂h/∂u = 1`, so the traces are hand-computable."""

    op: nn.Linear
    decay: float = eqx.field(static=True)

    def __init__(self, *, key):
        self.op = nn.Linear(2, 2, key=key)
        self.decay = 0.5

    def init_state(self):
        return jnp.zeros(2)

    def __call__(self, state, x):
        h = self.decay * state + self.op(x)
        return h, h


@pytest.mark.parametrize("bias_correction", [True, False])
def test_ppprop_recurrences_by_hand(bias_correction, getkey):
    alpha, lam = 0.25, 0.5
    cell = Affine(key=getkey())
    algorithm = eqtrace.PPProp(alpha, bias_correction=bias_correction)
    x0, x1 = jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0])
    state = cell.init_state()
    trace = algorithm.init_trace(cell, state, x0)
    state, trace, _ = algorithm.step(cell, state, trace, x0)
    np.testing.assert_allclose(trace.inputs[0], x0)
    np.testing.assert_allclose(trace.outputs[0], [[1.0] * 2])
    np.testing.assert_allclose(trace.normaliser, 1.0)
    state, trace, _ = algorithm.step(cell, state, trace, x1)
    eps_x = alpha * x0 + x1
    # The paper's output trace carries a factor (1 − α) that eqtrace folds into the normaliser.
    eps_f = alpha * lam * (1 - alpha) + (1 - alpha)
    np.testing.assert_allclose(trace.inputs[0], eps_x)
    np.testing.assert_allclose(trace.outputs[0], [[eps_f / (1 - alpha)] * 2])
    np.testing.assert_allclose(trace.normaliser, 1 + alpha)

    # The gradient of ⟨g, h_2⟩: (g ⊙ ε_f) ⊗ ε_x / (1 − α²), and for the bias g ⊙ ε_f / (1 − α).
    g = jnp.array([0.3, -1.1])
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    step = eqtrace.make_online_step(algorithm, static)
    prev_state = 0.5 * 0 + cell.op(x0)
    prev_trace = algorithm.init_trace(cell, state, x0)
    _, prev_trace, _ = algorithm.step(cell, cell.init_state(), prev_trace, x0)
    grads = jax.grad(lambda p: jnp.vdot(g, step(p, prev_state, prev_trace, x1)[2]))(params)
    correction = 1 - alpha**2 if bias_correction else 1.0
    bias_trace = (1 - alpha**2) / (1 - alpha)
    np.testing.assert_allclose(grads.op.weight, jnp.outer(g * eps_f, eps_x) / correction)
    np.testing.assert_allclose(grads.op.bias, g * eps_f * bias_trace / correction)


def test_drtrl_trace_recurrence_by_hand(getkey):
    # ε_W = λ ε_W + 1 ⊗ x_t for the affine cell.
    cell = Affine(key=getkey())
    algorithm = eqtrace.DRTRL()
    xs = [jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0]), jnp.array([-1.0, 0.25])]
    state, trace = cell.init_state(), algorithm.init_trace(cell, cell.init_state(), xs[0])
    expected = jnp.zeros((2, 2))
    for x in xs:
        state, trace, _ = algorithm.step(cell, state, trace, x)
        expected = 0.5 * expected + jnp.outer(jnp.ones(2), x)
    np.testing.assert_allclose(trace.ops[0].weight[..., 0], expected)
    np.testing.assert_allclose(trace.ops[0].bias[..., 0], [1 + 0.5 + 0.25] * 2)


def _nonzero_everywhere(grads) -> list[str]:
    leaves = jtu.tree_leaves_with_path(grads)
    return [jtu.keystr(p) for p, g in leaves if not bool(jnp.any(g != 0))]


@pytest.mark.parametrize("which, algorithm", pairs(["gru", "two-layer"], INEXACT))
def test_every_parameter_gets_a_gradient(which, algorithm, getkey):
    if which == "gru":
        model = nn.Sequential([nn.GRUCell(3, 4, key=getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    else:
        model = nn.Sequential(
            [
                eqx.nn.Linear(3, 3, key=getkey()),
                nn.GRUCell(3, 4, key=getkey()),
                LeakyCurrent(4, 5, key=getkey()),
                eqx.nn.Linear(5, 2, key=getkey()),
            ]
        )
    xs, targets = _sequence(getkey(), 5, 3, 2)
    online, _ = online_and_bptt(algorithm, model, xs, targets)
    assert _nonzero_everywhere(online) == []


@pytest.mark.parametrize("algorithm", BATCH_RULES)
def test_batch_equals_per_sample_loop(algorithm, getkey):
    model = nn.Sequential([nn.GRUCell(3, 4, key=getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batch, length = 3, 5
    xs = jr.normal(getkey(), (length, batch, 3))
    targets = jr.normal(getkey(), (length, batch, 2))
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch)

    def batch_loss(y, t):
        return jnp.sum((y - t) ** 2) / batch

    _, batched, _, _ = eqtrace.online_gradient(
        step, batch_loss, params, state, trace, xs, targets, reduction="sum"
    )
    # Each sample with its own slice of the batched trace (its own key, for UORO).
    per_sample = [
        online_and_bptt(
            algorithm, model, xs[:, b], targets[:, b], trace=jtu.tree_map(lambda a: a[b], trace)
        )[0]
        for b in range(batch)
    ]
    mean = jtu.tree_map(lambda *g: sum(g) / batch, *per_sample)
    assert relative_error(batched, mean) <= 1e-12


@pytest.mark.parametrize("algorithm", JIT_RULES)
def test_jit_equals_no_jit(algorithm, getkey):
    model = nn.GRUCell(3, 4, key=getkey())
    state = jr.normal(getkey(), (4,))
    x = jr.normal(getkey(), (3,))
    trace = algorithm.init_trace(model, state)
    _, trace, _ = algorithm.step(model, state, trace, x)
    eager = algorithm.step(model, state, trace, x)
    jitted = eqx.filter_jit(algorithm.step)(model, state, trace, x)
    assert relative_error(jitted, eager) <= 1e-12


def test_structure_check_flags_mixing_outside_ops(getkey):
    report = eqtrace.check(Rolling(3, 4, key=getkey()), x=jnp.zeros(3))
    assert not report.ok
    assert any("depends on other neurons" in v for v in report.violations)
    with pytest.raises(ValueError, match="outside a synaptic op"):
        eqtrace.DRTRL().init_trace(Rolling(3, 4, key=getkey()), jnp.zeros(4), jnp.zeros(3))
    # Opting out runs the rule as an approximation.
    eqtrace.DRTRL(strict=False).init_trace(Rolling(3, 4, key=getkey()), jnp.zeros(4), jnp.zeros(3))


def test_structure_check_passes_builtin_cells(getkey):
    for cell in [nn.RNNCell(3, 4, key=getkey()), nn.GRUCell(3, 4, key=getkey())]:
        report = eqtrace.check(cell)
        assert report.ok, str(report)
        assert "trace memory per sample" in str(report)


class BigParameter(eqtrace.AbstractCell):
    op: nn.Linear
    mixing: jax.Array

    def __init__(self, *, key):
        self.op = nn.Linear(3, 4, key=key)
        self.mixing = jnp.ones((9, 9))

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        h = jnp.tanh(state + self.op(x) + jnp.sum(self.mixing))
        return h, h


def test_untraceable_parameter_is_named(getkey):
    cell = BigParameter(key=getkey())
    for algorithm in [case.make(strict=False) for case in rules(needs_structure=True)]:
        with pytest.raises(ValueError, match=r"\.mixing.*RTRL"):
            algorithm.init_trace(cell, cell.init_state(), jnp.zeros(3))


def test_shared_weights_under_drtrl_and_ppprop(getkey):
    # D-RTRL keeps a trace per (output position, kernel weight), pp-prop its input and output
    # traces: both equal RTRL at the first step (more in test_shared_weight_ops.py).
    cell = ConvCell(key=getkey())
    x = jr.normal(getkey(), (2, 6))
    state = jr.normal(getkey(), (3, 6))
    xs, targets = x[None], jr.normal(getkey(), (1, 3, 6))
    exact, _ = online_and_bptt(eqtrace.RTRL(), cell, xs, targets, state=state)
    for algorithm in (eqtrace.DRTRL(), eqtrace.PPProp(0.5)):
        online, _ = online_and_bptt(algorithm, cell, xs, targets, state=state)
        assert relative_error(online, exact) <= 1e-12


@pytest.mark.parametrize("algorithm", FIRST_STEP)
def test_embedding_and_masked_ops(algorithm, getkey):
    cell = TokenCell(key=getkey())
    state = jr.normal(getkey(), (4,))
    tokens = jnp.array([3])
    targets = jr.normal(getkey(), (1, 4))
    online, _ = online_and_bptt(algorithm, cell, tokens, targets, state=state)
    exact, _ = online_and_bptt(eqtrace.RTRL(), cell, tokens, targets, state=state)
    assert relative_error(online, exact) <= 1e-12
    # Masked weights get exactly zero gradient; the others do not.
    mask = cell.recurrent.mask
    assert bool(jnp.all(online.recurrent.weight[~mask] == 0))


def test_trace_sizes_match_formulas(getkey):
    input_size, hidden = 3, 4
    gru = nn.GRUCell(input_size, hidden, key=getkey())
    ops_params = 3 * hidden * (input_size + hidden) + 2 * 3 * hidden
    assert eqtrace.trace_size(eqtrace.DRTRL(), gru).values == 1 * ops_params
    # pp-prop: per op I + K·O, plus the normaliser.
    assert (
        eqtrace.trace_size(eqtrace.PPProp(0.5), gru).values
        == (input_size + hidden) + 2 * 3 * hidden + 1
    )
    leaky = LeakyCurrent(input_size, hidden, key=getkey())
    x = jnp.zeros(input_size)
    k = 2  # two state leaves
    drtrl = k * (hidden * input_size + hidden) + k * hidden + k * hidden * 1
    assert eqtrace.trace_size(eqtrace.DRTRL(), leaky, x).values == drtrl
    ppprop = input_size + k * hidden + k * hidden + k * hidden * 1 + 1
    assert eqtrace.trace_size(eqtrace.PPProp(0.5), leaky, x).values == ppprop
    assert eqtrace.trace_size(eqtrace.RTRL(), gru).values == hidden * ops_params
    # Ops whose outputs are summed (W_ih x + W_hh h) share pp-prop's output trace.
    rnn = nn.RNNCell(input_size, hidden, key=getkey())
    assert eqtrace.trace_size(eqtrace.PPProp(0.5), rnn).values == (input_size + hidden) + hidden + 1


def test_ppprop_arguments():
    assert eqtrace.PPProp(rank=3).decay == pytest.approx(0.5)
    with pytest.raises(ValueError, match="exactly one"):
        eqtrace.PPProp()
    with pytest.raises(ValueError, match="exactly one"):
        eqtrace.PPProp(0.5, rank=2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        eqtrace.PPProp(1.0)


def test_drtrl_bfloat16_traces_track_float32(getkey):
    model = nn.GRUCell(3, 8, key=getkey())
    model = cast(model, jnp.float32)
    xs = jr.normal(getkey(), (6, 3), jnp.float32)
    targets = jr.normal(getkey(), (6, 8), jnp.float32)
    full, _ = online_and_bptt(eqtrace.DRTRL(), model, xs, targets)
    low, _ = online_and_bptt(eqtrace.DRTRL(trace_dtype=jnp.bfloat16), model, xs, targets)
    assert relative_error(low, full) < 5e-2
    assert math.isfinite(relative_error(low, full))


@pytest.mark.parametrize("algorithm", EXACT_ELEMENTWISE)
def test_loss_on_a_state_leaf_outside_the_output(algorithm, getkey):
    # A loss on a state leaf that `y` does not show (the current of the two-leaf neuron) is
    # credited through the trace too: D-RTRL stays exact for this element-wise layer.
    model = LeakyCurrent(3, 4, key=getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    xs, targets = _sequence(getkey(), 5, 3, 4)
    online_step = eqtrace.make_online_step(algorithm, static)

    def step_with_state(params, state, trace, x):
        state, trace, y = online_step(params, state, trace, x)
        return state, trace, (y, state)

    def loss_fn(y_and_state, target):
        y, (current, _) = y_and_state
        return jnp.sum((y - target) ** 2) + 0.3 * jnp.sum(current**2)

    state = model.init_state()
    trace = algorithm.init_trace(model, state, xs[0])
    _, online, _, _ = eqtrace.online_gradient(
        step_with_state, loss_fn, params, state, trace, xs, targets, reduction="sum"
    )

    def forward_with_state(params, state, x):
        state, y = eqx.combine(params, static)(state, x)
        return state, (y, state)

    _, bptt, _ = eqtrace.bptt_gradient(
        forward_with_state, loss_fn, params, state, xs, targets, reduction="sum"
    )
    assert relative_error(online, bptt) <= 1e-9
    assert bool(jnp.all(online.log_tau != 0))


@pytest.mark.parametrize("algorithm", EXACT_ELEMENTWISE)
def test_step_loss_on_state_and_output(algorithm, getkey):
    # A loss on the returned state (not only y) is credited too.
    model = LeakyTanh(3, 4, key=getkey())
    xs, targets = _sequence(getkey(), 4, 3, 4)
    online, bptt = online_and_bptt(algorithm, model, xs, targets, loss_fn=squared_loss)
    assert relative_error(online, bptt) <= 1e-9


@pytest.mark.parametrize("name, algorithm", pairs(EVERY_CELL, FIRST_STEP))
def test_every_cell_first_step_equals_rtrl(name, algorithm, getkey):
    cell = make_cell(name, getkey())
    assert eqtrace.check(cell).ok, str(eqtrace.check(cell))
    state = jtu.tree_map(lambda s: jr.uniform(getkey(), s.shape, s.dtype), cell.init_state())
    xs = 3 * jr.normal(getkey(), (1, 3))
    y_shape = jax.eval_shape(cell.output, state).shape
    targets = jr.normal(getkey(), (1, *y_shape))
    online, _ = online_and_bptt(algorithm, cell, xs, targets, state=state)
    exact, _ = online_and_bptt(eqtrace.RTRL(), cell, xs, targets, state=state)
    assert relative_error(online, exact) <= 1e-12  # measured: 0 (D-RTRL), 2e-16 (pp-prop)


@pytest.mark.parametrize("case", algorithm_cases())
def test_check_finite_is_opt_in(case, getkey):
    algorithm = case.make(check_finite=True)
    model = nn.GRUCell(3, 4, key=getkey())
    state = model.init_state()
    trace = algorithm.init_trace(model, state)
    bad = jnp.array([jnp.nan, 0.0, 1.0])
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(algorithm.step(model, state, trace, bad))
    # Without the flag the NaN passes through silently, as in plain JAX.
    lenient = eqx.tree_at(lambda a: a.check_finite, algorithm, False)
    _, new_trace, _ = lenient.step(model, state, trace, bad)
    assert not bool(jnp.all(jnp.isfinite(jtu.tree_leaves(new_trace)[0])))
