"""Regression tests for user cells and networks the library did not enumerate: one test per
defect found by trying them as a new user would (each failed before its fix)."""

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
    LeakyTanh,
    cast,
    online_and_bptt,
    online_in_blocks,
    pairs,
    relative_error,
    squared_loss,
)
from registry import ALGORITHMS, TRACE_KINDS, algorithms, rules


#: The rules that analyse a cell's structure (and refuse what breaks their assumptions).
STRUCTURAL = algorithms(needs_structure=True)
#: Rules exact on an element-wise layer but not on any cell.
EXACT_ELEMENTWISE = algorithms(exact_elementwise=True, exact=False)
#: Rules that equal RTRL at T = 1 (exact rules are held to BPTT instead, a stronger oracle).
FIRST_STEP_RULES = [
    case.algorithm
    for case in rules(equals_rtrl_at_first_step=True, exact=False, first_step_as=None)
]


def first_step_gradient(algorithm, model, state, x, target):
    """The online gradient of one step from `state`, through the trace path."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    trace = algorithm.init_trace(model, state, x)
    step = eqtrace.make_online_step(algorithm, static)
    return jax.grad(lambda p: jnp.sum((step(p, state, trace, x)[2] - target) ** 2))(params)


def assert_first_step_equals_rtrl(model, key, input_size, *, rules=FIRST_STEP_RULES, tol=1e-12):
    skey, xkey, tkey = jr.split(key, 3)
    state = jtu.tree_map(lambda s: jr.normal(skey, s.shape, s.dtype), model.init_state())
    x = jr.normal(xkey, (input_size,))
    target = jr.normal(tkey, jax.eval_shape(model, state, x)[1].shape)
    exact = first_step_gradient(eqtrace.RTRL(), model, state, x, target)
    for rule in rules:
        assert relative_error(first_step_gradient(rule, model, state, x, target), exact) <= tol


class CalledOutOfOrder(eqtrace.AbstractCell):
    """Declares `a` before `b` but calls `b` first (the records were paired with the wrong op)."""

    a: eqx.nn.Linear
    b: eqx.nn.Linear
    decay: jax.Array

    def __init__(self, *, key):
        akey, bkey = jr.split(key)
        self.a = eqx.nn.Linear(3, 4, key=akey)
        self.b = eqx.nn.Linear(3, 4, key=bkey)
        self.decay = jnp.linspace(0.2, 0.8, 4)

    def init_state(self):
        return jnp.zeros(4, self.decay.dtype)

    def __call__(self, state, x):
        gate = jax.nn.sigmoid(self.b(jnp.sin(2 * x)))
        h = self.decay * state + gate * jnp.tanh(self.a(x))
        return h, h


class SixLinearGRU(eqtrace.AbstractCell):
    """A GRU written with six plain `eqx.nn.Linear`s, declared `ir, iz, in_, hr, hz, hn` and
    called in the natural order (used to crash with a broadcasting error)."""

    ir: eqx.nn.Linear
    iz: eqx.nn.Linear
    in_: eqx.nn.Linear
    hr: eqx.nn.Linear
    hz: eqx.nn.Linear
    hn: eqx.nn.Linear

    def __init__(self, *, key):
        keys = jr.split(key, 6)
        self.ir, self.iz, self.in_ = (eqx.nn.Linear(3, 4, key=k) for k in keys[:3])
        self.hr, self.hz, self.hn = (eqx.nn.Linear(4, 4, key=k) for k in keys[3:])

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        r = jax.nn.sigmoid(self.ir(x) + self.hr(h))
        z = jax.nn.sigmoid(self.iz(x) + self.hz(h))
        n = jnp.tanh(self.in_(x) + r * self.hn(h))
        h = (1 - z) * n + z * h
        return h, h


class ReusedOp(eqtrace.AbstractCell):
    """One op called twice per step, the second call's outputs reaching other neurons."""

    op: nn.Linear
    decay: jax.Array

    def __init__(self, *, key):
        self.op = nn.Linear(3, 4, key=key)
        self.decay = jnp.linspace(0.2, 0.8, 4)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        h = self.decay * state + jnp.tanh(self.op(x)) + jnp.roll(self.op(x**2), 1)
        return h, h


class ActivationField(eqtrace.AbstractCell):
    """Holds its activation function as an ordinary (non-static) field."""

    op: eqx.nn.Linear
    activation: object

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 4, key=key)
        self.activation = jnp.tanh

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        h = 0.5 * state + self.activation(self.op(x))
        return h, h


@pytest.mark.parametrize("algorithm", EXACT_ELEMENTWISE)
@pytest.mark.parametrize("cell_cls", [CalledOutOfOrder, ReusedOp, ActivationField])
def test_equals_bptt_on_elementwise_user_cells(cell_cls, algorithm, getkey):
    model = nn.Sequential([cell_cls(key=getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    xs, targets = jr.normal(getkey(), (5, 3)), jr.normal(getkey(), (5, 2))
    online, bptt = online_and_bptt(algorithm, model, xs, targets)
    assert relative_error(online, bptt) <= 1e-10


@pytest.mark.parametrize("cell_cls", [CalledOutOfOrder, SixLinearGRU, ReusedOp])
def test_first_step_equals_rtrl_whatever_the_op_order(cell_cls, getkey):
    assert_first_step_equals_rtrl(cell_cls(key=getkey()), getkey(), 3)


def test_check_names_each_call_of_a_reused_op(getkey):
    report = eqtrace.check(ReusedOp(key=getkey()), x=jnp.zeros(3))
    assert report.ok
    assert ".op (call 1 of 2)" in str(report) and ".op (call 2 of 2)" in str(report)


def _stateless_layers(key):
    k1, k2, k3 = jr.split(key, 3)
    return [
        eqx.nn.MLP(2, 3, width_size=5, depth=2, key=k1),
        jnp.tanh,
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Sequential([eqx.nn.Linear(3, 3, key=k2), eqx.nn.Lambda(jnp.sin)]),
        eqx.nn.Linear(3, 3, key=k3),
    ]


def test_stateless_layers_of_every_kind(getkey):
    encoder = _stateless_layers(getkey())
    model = nn.Sequential(
        [*encoder, nn.GRUCell(3, 4, key=getkey()), jnp.tanh, ActivationField(key=getkey())]
    )
    model = eqx.tree_at(lambda m: m.layers[-1].op, model, eqx.nn.Linear(4, 4, key=getkey()))
    xs, targets = jr.normal(getkey(), (4, 2)), jr.normal(getkey(), (4, 4))
    online, bptt = online_and_bptt(eqtrace.RTRL(), model, xs, targets)
    assert relative_error(online, bptt) <= 1e-10
    assert_first_step_equals_rtrl(
        nn.Sequential([*encoder, ActivationField(key=getkey()), eqx.nn.Lambda(jnp.sin)]),
        getkey(),
        2,
    )
    for rule in [case.algorithm for case in ALGORITHMS]:
        # The input size comes from the first layer (`eqx.nn.MLP.in_size`): no example needed.
        assert eqtrace.check(model, rule).refusal is None
        eqtrace.init_state_and_trace(model, rule)


class OutputNotOfState(eqtrace.AbstractCell):
    """Returns a `y` that is not `output(new_state)`."""

    op: eqx.nn.Linear

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 4, key=key)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        h = jnp.tanh(self.op(x) + state)
        return h, 2 * h


@pytest.mark.parametrize("rule", algorithms())
def test_every_rule_refuses_an_output_that_is_not_of_the_state(rule, getkey):
    cell, x = OutputNotOfState(key=getkey()), jnp.zeros(3)
    with pytest.raises(ValueError, match="output\\(new_state\\)"):
        rule.step(cell, cell.init_state(), rule.init_trace(cell, cell.init_state(), x), x)
    report = eqtrace.check(cell, rule, x=x)
    assert report.refusal is not None and "output(new_state)" in report.refusal


class RawWeightUse(eqtrace.AbstractCell):
    """Uses its op's weight matrix directly besides calling the op."""

    op: eqx.nn.Linear

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(4, 4, key=key)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        h = jnp.tanh(self.op(x) + 0.1 * self.op.weight @ state)
        return h, h


class WeightNormed(eqtrace.AbstractCell):
    """`eqx.nn.WeightNorm` around an op: it calls a copy of its layer holding `g v / |v|`, so
    the call computes with weights that are not the op's own arrays. Every pattern check
    passed (the call's output depends on `v`), and D-RTRL, SnAp-1, e-prop and pp-prop gave
    `v` the gradient of `v x`: relative error 1.2 at the first step (found by the audit)."""

    op: eqx.nn.WeightNorm
    decay: jax.Array

    def __init__(self, *, key):
        self.op = eqx.nn.WeightNorm(eqx.nn.Linear(4, 4, key=key))
        self.decay = jnp.linspace(0.3, 0.8, 4)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        h = self.decay * state + jnp.tanh(self.op(x))
        return h, h


class TiedOps(eqtrace.AbstractCell):
    """Two ops with tied weights through `eqx.nn.Shared`, which holds a placeholder in the
    second op and rebuilds it at each call (the analysis crashed on the placeholder)."""

    shared: eqx.nn.Shared

    def __init__(self, *, key):
        akey, bkey = jr.split(key)
        ops = (eqx.nn.Linear(4, 4, key=akey), eqx.nn.Linear(4, 4, key=bkey))
        self.shared = eqx.nn.Shared(ops, lambda p: p[1].weight, lambda p: p[0].weight)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        a, b = self.shared()
        h = 0.5 * state + jnp.tanh(a(x) + b(x**2))
        return h, h


REBUILT = "called with weights or masks other than its own arrays"


class MaskSwapped(eqtrace.AbstractCell):
    """Calls its masked op with another mask put in by `eqx.tree_at`: the op's floating arrays
    are its own, but the traces read the held mask (D-RTRL was 1.0 off at the first step)."""

    rec: nn.Linear
    other: jax.Array

    def __init__(self, *, key):
        self.rec = nn.Linear(4, 4, mask=jnp.eye(4, dtype=bool), key=key)
        self.other = jnp.asarray(np.random.default_rng(0).random((4, 4)) < 0.5)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        op = eqx.tree_at(lambda op: op.mask, self.rec, self.other)
        h = 0.5 * state + jnp.tanh(op(jnp.tanh(state)) + x)
        return h, h


@pytest.mark.parametrize("rule", STRUCTURAL)
@pytest.mark.parametrize(
    "cell_cls, match",
    [
        (RawWeightUse, "`.op` change the state other than through calls"),
        (WeightNormed, f"{REBUILT} \\(`.op.layer`\\)"),
        (TiedOps, f"{REBUILT} \\(`.shared.pytree\\[1\\]`\\)"),
        (MaskSwapped, f"{REBUILT} \\(`.rec`\\)"),
    ],
)
def test_weights_used_outside_calls_are_refused(cell_cls, match, rule, getkey):
    cell, x = cell_cls(key=getkey()), jnp.zeros(4)
    with pytest.raises(ValueError, match=match):
        rule.init_trace(cell, cell.init_state(), x)
    report = eqtrace.check(cell, rule, x=x)
    assert not report.ok
    if report.cells[0] is None:  # The refusal stopped the analysis: the report says so.
        text = str(report)
        assert "layer 0: structure not read: refused" in text and "structure: refused" in text
        assert "no diagonal structure needed" not in text


def test_check_agrees_with_the_step(getkey):
    x = jnp.zeros(3)
    for cell in [CalledOutOfOrder(key=getkey()), OutputNotOfState(key=getkey())]:
        lenient = [case.make(strict=False) for case in rules(needs_structure=True)]
        for rule in [*(case.algorithm for case in ALGORITHMS), *lenient]:
            refusal = eqtrace.check(cell, rule, x=x).refusal
            try:
                rule.step(cell, cell.init_state(), rule.init_trace(cell, cell.init_state(), x), x)
            except ValueError as error:
                assert refusal == str(error)
            else:
                assert refusal is None


@pytest.mark.parametrize(
    "rule, dtype",
    [
        # One rule per kind of trace in float32 or bfloat16, rotating (every rule in both
        # under `LONG`).
        *pairs(
            [
                pytest.param(case.algorithm, id=case.name)
                for case in ALGORITHMS
                if LONG or case.name in TRACE_KINDS
            ],
            [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")],
        ),
        # And float16 for one rule.
        *[
            pytest.param(case.algorithm, jnp.float16, id=f"{case.name}-f16")
            for case in ALGORITHMS
            if case.name == "ppprop"
        ],
    ],
)
def test_every_rule_runs_in_the_models_dtype(rule, dtype, getkey):
    """With x64 on (as in every test here), a float32 model must stay float32, and 16-bit models
    must run in 16 bits; the gradient is that of the float64 model up to the dtype's precision."""
    model64 = nn.Sequential([nn.GRUCell(3, 4, key=getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    model = cast(model64, dtype)
    xs, targets = jr.normal(getkey(), (3, 3)), jr.normal(getkey(), (3, 2))
    grads, _ = online_and_bptt(rule, model, xs.astype(dtype), targets.astype(dtype))
    reference, _ = online_and_bptt(rule, model64, xs, targets)
    assert {leaf.dtype for leaf in jtu.tree_leaves(grads)} == {jnp.dtype(dtype)}
    tolerance = 1e-5 if dtype == jnp.float32 else 0.1
    assert relative_error(cast(grads, jnp.float64), reference) <= tolerance


def test_ppprop_has_no_counter_to_overflow(getkey):
    """The bias correction is carried as the normaliser `n = 1 + α + … + α^t`, bounded by
    `1/(1 − α)`; after any number of steps (2^31 and more) the gradient is finite and equals
    the stationary rule's."""
    rule = eqtrace.PPProp(decay=0.5)
    cell, x = CalledOutOfOrder(key=getkey()), jr.normal(getkey(), (3,))
    trace = rule.init_trace(cell, cell.init_state(), x)
    assert all(jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in jtu.tree_leaves(trace))
    state = cell.init_state()
    step = eqx.filter_jit(rule.step)  # one compilation for the 60 steps
    for _ in range(60):  # far enough for n to reach 1/(1 − α) = 2 in float64
        state, trace, _ = step(cell, state, trace, x)
    assert float(trace.normaliser) == 2.0
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    step = eqtrace.make_online_step(rule, static)
    grads = jax.grad(lambda p: jnp.sum(step(p, state, trace, x)[2]))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jtu.tree_leaves(grads))


def test_ppprop_refuses_a_decay_that_rounds_to_one(getkey):
    cell = cast(CalledOutOfOrder(key=getkey()), jnp.float32)
    with pytest.raises(ValueError, match="rounds to 1.0 in float32"):
        eqtrace.PPProp(rank=1e9).init_trace(cell, cell.init_state(), jnp.zeros(3, jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_ppprop_first_step_equals_drtrl_as_decay_approaches_one(dtype, getkey):
    cell = cast(CalledOutOfOrder(key=getkey()), dtype)
    state = jr.normal(getkey(), (4,), dtype)
    x, target = jr.normal(getkey(), (3,), dtype), jr.normal(getkey(), (4,), dtype)
    reference = first_step_gradient(eqtrace.DRTRL(), cell, state, x, target)
    rule = eqtrace.PPProp(decay=1 - 1e-6)
    error = relative_error(first_step_gradient(rule, cell, state, x, target), reference)
    assert error <= (1e-6 if dtype == jnp.float32 else 1e-14)


def test_rnn_cell_in_every_dtype(getkey):
    for dtype in [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64]:
        cell = nn.RNNCell(3, 4, dtype=dtype, key=getkey())
        _, y = cell(cell.init_state(), jnp.ones(3, dtype))
        assert y.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(cell.recurrent_op.weight @ cell.recurrent_op.weight.T, np.float64),
            np.eye(4),
            atol=0.05,
        )


class VmappedOp(eqtrace.AbstractCell):
    """Applies its op at several positions with `jax.vmap` inside the step."""

    op: eqx.nn.Linear

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 2, key=key)

    def init_state(self):
        return jnp.zeros((4, 2))

    def __call__(self, state, x):
        h = 0.5 * state + jnp.tanh(jax.vmap(self.op)(x))
        return h, h


class OpInCond(eqtrace.AbstractCell):
    """Calls its op in one branch of a `lax.cond` on the input: the input is ignored on steps
    whose last entry is negative."""

    op: eqx.nn.Linear

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 2, key=key)

    def init_state(self):
        return jnp.zeros(2)

    def __call__(self, state, x):
        drive = jax.lax.cond(x[-1] > 0, lambda: jnp.tanh(self.op(x)), lambda: jnp.zeros(2))
        h = 0.5 * state + drive
        return h, h


@pytest.mark.parametrize("rule", STRUCTURAL)
@pytest.mark.parametrize("cell_cls, x", [(VmappedOp, jnp.ones((4, 3))), (OpInCond, jnp.ones(3))])
def test_an_op_called_inside_a_transformation_is_refused(cell_cls, x, rule, getkey):
    """It used to crash with an `UnexpectedTracerError` from inside the analysis (within a
    `lax.cond` branch, also when the analysis ran under `jit`)."""
    cell = cell_cls(key=getkey())
    with pytest.raises(ValueError, match="called inside a JAX transformation"):
        rule.init_trace(cell, cell.init_state(), x)
    assert "inside a JAX transformation" in eqtrace.check(cell, rule, x=x).refusal
    xs = jnp.stack([x, -x])  # the op's branch, then the other one
    targets = jnp.ones((2, *cell.init_state().shape))
    online, bptt = online_and_bptt(eqtrace.RTRL(), cell, xs, targets)
    assert relative_error(online, bptt) <= 1e-12


# The block path for the rules that compute blocks their own way. Rules that scan their step
# are held for one rule per kind of trace by default (every rule under `LONG`).
@pytest.mark.parametrize(
    "rule, blocks",
    [
        pytest.param(c.algorithm, c.own_blocks, id=c.name)
        for c in ALGORITHMS
        if LONG or c.own_blocks or c.name in TRACE_KINDS
    ],
)
def test_grad_of_jitted_vmapped_step_and_block(rule, blocks, getkey):
    """`jax.grad(jax.jit(jax.vmap(step)))` used to fail inside JAX (a constant link value
    under `vmap`); it must equal the gradient without `jit`."""
    model = nn.Sequential([CalledOutOfOrder(key=getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, rule, batch_size=2, x=jnp.zeros(3))
    xs = jr.normal(getkey(), (2, 3, 3))  # (batch, time, input)
    step = jax.vmap(eqtrace.make_online_step(rule, static), in_axes=(None, 0, 0, 0))
    block = jax.vmap(
        eqtrace.make_online_block(rule, static), in_axes=(None, 0, 0, 0), out_axes=(0, 0, 0)
    )
    for function, x in [(step, xs[:, 0]), (block, xs)][: 2 if blocks else 1]:

        def loss(p, function=function, x=x):
            return jnp.sum(jnp.sin(function(p, state, trace, x)[2]))

        eager = jax.grad(loss)(params)
        assert relative_error(jax.grad(jax.jit(loss))(params), eager) <= 1e-12
        jitted = jax.jit(function)
        assert (
            relative_error(
                jax.grad(lambda p, x=x: jnp.sum(jnp.sin(jitted(p, state, trace, x)[2])))(params),
                eager,
            )
            <= 1e-12
        )


class Relay(eqtrace.AbstractCell):
    """Leaf `a` is driven by `x`; the output leaf `h` reads the previous `a` through an op, a
    path the diagonal rules cut, so `inp` would get an exactly zero gradient (found by the
    generated tests)."""

    inp: eqx.nn.Linear
    rec: eqx.nn.Linear

    def __init__(self, *, key):
        ikey, rkey = jr.split(key)
        self.inp = eqx.nn.Linear(3, 2, key=ikey)
        self.rec = eqx.nn.Linear(2, 2, key=rkey)

    def init_state(self):
        return jnp.zeros(2), jnp.zeros(2)

    def __call__(self, state, x):
        a, _ = state
        new_state = (jnp.tanh(self.inp(x)), jnp.tanh(self.rec(a)))
        return new_state, self.output(new_state)

    def output(self, state):
        return state[1]


@pytest.mark.parametrize("rule", STRUCTURAL)
def test_a_silent_zero_gradient_is_refused(rule, getkey):
    cell, x = Relay(key=getkey()), jnp.zeros(3)
    with pytest.raises(ValueError, match="`.inp` acts only on the state leaves"):
        rule.init_trace(cell, cell.init_state(), x)


class ScaledOutput(eqtrace.AbstractCell):
    """A parameter that reaches the output but not the state (found by the generated tests:
    its missing trace failed the type check)."""

    op: eqx.nn.Linear
    gain: jax.Array

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 2, key=key)
        self.gain = jnp.array(1.5)

    def init_state(self):
        return jnp.zeros(2)

    def __call__(self, state, x):
        h = 0.5 * state + jnp.tanh(self.op(x))
        return h, self.output(h)

    def output(self, state):
        return self.gain * state


@pytest.mark.parametrize("algorithm", EXACT_ELEMENTWISE)
def test_a_parameter_of_the_output_only_gets_its_exact_gradient(algorithm, getkey):
    model = ScaledOutput(key=getkey())
    assert "does not reach the state" in str(eqtrace.check(model, x=jnp.zeros(3)))
    xs, targets = jr.normal(getkey(), (4, 3)), jr.normal(getkey(), (4, 2))
    online, bptt = online_and_bptt(algorithm, model, xs, targets)
    assert relative_error(online, bptt) <= 1e-10
    # And in blocks (D-RTRL's own block computation crashed inside `jax.vmap`).
    _, blocked, _, _ = online_in_blocks(algorithm, model, xs, targets, block_size=2)
    assert relative_error(blocked, bptt) <= 1e-10


class CountingCell(eqtrace.AbstractCell):
    """A step counter (integer) and a per-neuron flag (boolean) beside a float leaf: they carry
    no derivative (the link used to give them integer tangents, which JAX rejects)."""

    op: eqx.nn.Linear
    decay: jax.Array

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 4, key=key)
        self.decay = jnp.linspace(0.3, 0.8, 4)

    def init_state(self):
        return jnp.zeros(4), jnp.zeros((), jnp.int32), jnp.zeros(4, bool)

    def __call__(self, state, x):
        h, count, flag = state
        h = jnp.where(flag, 0.2, self.decay) * h + jnp.tanh(self.op(x)) / (1.0 + count)
        new_state = (h, count + 1, h > 0)
        return new_state, self.output(new_state)

    def output(self, state):
        return state[0]


@pytest.mark.parametrize("rule", algorithms(needs_structure=False))
def test_integer_and_boolean_state_leaves(rule, getkey):
    """The rules that treat a cell as one system take them (exact RTRL equals BPTT, through a
    stateless layer and in blocks); the diagonal rules refuse them clearly."""
    model = nn.Sequential([CountingCell(key=getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    state = (
        (jr.normal(getkey(), (4,)), jnp.array(1, jnp.int32), jnp.array([True, False] * 2)),
        None,
    )
    xs, targets = jr.normal(getkey(), (3, 3)), jr.normal(getkey(), (3, 2))
    online, bptt = online_and_bptt(rule, model, xs, targets, state=state)
    if isinstance(rule, eqtrace.RTRL):
        assert relative_error(online, bptt) <= 1e-10
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jtu.tree_leaves(online))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    trace = rule.init_trace(model, state, xs[0])
    stepped = eqtrace.online_gradient(
        eqtrace.make_online_step(rule, static),
        squared_loss,
        params,
        state,
        trace,
        xs,
        targets,
        reduction="sum",
    )
    blocked = online_in_blocks(rule, model, xs, targets, block_size=2, state=state)
    # Loss, gradient and trace (the final states hold booleans).
    assert relative_error(blocked[:2] + blocked[3:], stepped[:2] + stepped[3:]) <= 1e-10


@pytest.mark.parametrize("rule", STRUCTURAL)
def test_integer_state_leaves_are_refused_by_the_diagonal_rules(rule, getkey):
    cell, x = CountingCell(key=getkey()), jnp.zeros(3)
    with pytest.raises(ValueError, match="`state\\[1\\]` is int32, `state\\[2\\]` is bool"):
        rule.init_trace(cell, cell.init_state(), x)


class ComplexCell(eqtrace.AbstractCell):
    """An LRU written with a complex state, a complex per-neuron eigenvalue and a real input
    op: the state is not complex-linear in the op's weights (RTRL's complex Jacobian held only
    its real part and gave a wrong gradient)."""

    op: eqx.nn.Linear
    eigenvalue: jax.Array

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 4, key=key)
        self.eigenvalue = jnp.linspace(0.5, 0.9, 4) * jnp.exp(1j * jnp.linspace(0.1, 1.0, 4))

    def init_state(self):
        return jnp.zeros(4, jnp.complex128)

    def __call__(self, state, x):
        h = self.eigenvalue * state + self.op(x) * (1 + 0.5j)
        return h, self.output(h)

    def output(self, state):
        return jnp.real(state) + jnp.abs(state) ** 2


@pytest.mark.parametrize("rule", algorithms(needs_structure=False))
def test_complex_state_and_parameters(rule, getkey):
    model = ComplexCell(key=getkey())
    state = (jr.normal(getkey(), (4,)) + 1j * jr.normal(getkey(), (4,))) / 2
    xs, targets = jr.normal(getkey(), (3, 3)), jr.normal(getkey(), (3, 4))
    online, bptt = online_and_bptt(rule, model, xs, targets, state=state)
    if isinstance(rule, eqtrace.RTRL):
        assert relative_error(online, bptt) <= 1e-10
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jtu.tree_leaves(online))


@pytest.mark.parametrize("rule", STRUCTURAL)
def test_complex_state_leaves_are_refused_by_the_diagonal_rules(rule, getkey):
    cell, x = ComplexCell(key=getkey()), jnp.zeros(3)
    with pytest.raises(ValueError, match="need real state leaves, but these are complex: `state`"):
        rule.init_trace(cell, cell.init_state(), x)


class NoOps(eqtrace.AbstractCell):
    """No synaptic op: a small raw input weight (`jnp.einsum`, a shared parameter with a dense
    trace) and a per-neuron decay (SnAp-1 crashed inside `jax.jacrev` on a cell without op
    calls)."""

    weight: jax.Array
    decay: jax.Array

    def __init__(self, *, key):
        self.weight = jr.normal(key, (4, 3)) / 2
        self.decay = jnp.linspace(0.2, 0.8, 4)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        h = self.decay * state + jnp.tanh(jnp.einsum("hi,i->h", self.weight, x))
        return h, h


@pytest.mark.parametrize("algorithm", EXACT_ELEMENTWISE)
def test_a_cell_without_ops(algorithm, getkey):
    model = NoOps(key=getkey())
    xs, targets = jr.normal(getkey(), (3, 3)), jr.normal(getkey(), (3, 4))
    online, bptt = online_and_bptt(algorithm, model, xs, targets)
    assert relative_error(online, bptt) <= 1e-10


@jax.custom_vjp
def _vjp_spike(v):
    return (v > 0).astype(v.dtype)


def _vjp_spike_fwd(v):
    return _vjp_spike(v), v


def _vjp_spike_bwd(v, cotangent):
    return (cotangent / (1 + 10 * jnp.abs(v)) ** 2,)


_vjp_spike.defvjp(_vjp_spike_fwd, _vjp_spike_bwd)


class VJPSpiking(eqtrace.AbstractCell):
    """Spikes through a `jax.custom_vjp` surrogate (docs ask for `custom_jvp`), fed back as a
    state leaf: exact RTRL pushed tangents forward through it and crashed inside JAX."""

    op: eqx.nn.Linear

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 4, key=key)

    def init_state(self):
        return jnp.zeros(4), jnp.zeros(4)

    def __call__(self, state, x):
        v, z = state
        v = 0.9 * v + self.op(x) - 0.5 * z
        new_state = (v, _vjp_spike(v - 0.3))
        return new_state, self.output(new_state)

    def output(self, state):
        return state[1]


@pytest.mark.parametrize("rule", [eqtrace.RTRL(), eqtrace.DRTRL()], ids=["rtrl", "drtrl"])
def test_a_custom_vjp_surrogate(rule, getkey):
    """Every rule runs a `custom_vjp` function in reverse mode only, except UORO, whose forward
    product `J^h h̃` it refuses clearly."""
    model = VJPSpiking(key=getkey())
    state = (jr.normal(getkey(), (4,)), jnp.zeros(4))
    xs, targets = jr.normal(getkey(), (3, 3)), jr.normal(getkey(), (3, 4))
    online, bptt = online_and_bptt(rule, model, xs, targets, state=state)
    assert relative_error(online, bptt) <= 1e-10
    assert any(bool(jnp.any(g != 0)) for g in jtu.tree_leaves(bptt))
    uoro = eqtrace.UORO(key=jr.key(0))
    with pytest.raises(ValueError, match="UORO cannot run VJPSpiking: its state goes through"):
        uoro.init_trace(model, state, xs[0])
    with pytest.raises(ValueError, match="UORO cannot run VJPSpiking: its state goes through"):
        uoro.steps(model, state, None, xs)  # its blocks too


class ScalarOps(eqtrace.AbstractCell):
    """`eqx.nn.Linear("scalar", ...)` ops, which take or give a 0-d array: a 0-d input and 0-d
    state leaves, one driving itself through an op (each crashed in the dense algebra's
    indexing)."""

    inp: eqx.nn.Linear
    self_op: eqx.nn.Linear
    decay: jax.Array

    def __init__(self, *, key):
        ikey, skey = jr.split(key)
        self.inp = eqx.nn.Linear("scalar", "scalar", key=ikey)
        self.self_op = eqx.nn.Linear("scalar", "scalar", use_bias=False, key=skey)
        self.decay = jnp.asarray(0.6)

    def init_state(self):
        return jnp.zeros(()), jnp.zeros(())

    def __call__(self, state, x):
        h, c = state
        h = self.decay * h + jnp.tanh(self.inp(x))
        c = jnp.tanh(0.5 * self.self_op(c) + x)
        return (h, c), self.output((h, c))

    def output(self, state):
        h, c = state
        return h * c


@pytest.mark.parametrize(
    "algorithm",
    # A weight-shaped trace and SnAp-n's by default, every first-step rule under `LONG`.
    [r for r in FIRST_STEP_RULES if LONG or type(r).__name__ in ("DRTRL", "SnAp")],
    ids=lambda a: type(a).__name__,
)
def test_scalar_ops(algorithm, getkey):
    model = ScalarOps(key=getkey())
    state = jtu.tree_map(lambda s: s + 0.3, model.init_state())
    xs = jr.normal(getkey(), (3,))
    targets = jr.normal(getkey(), (3,))
    exact = first_step_gradient(eqtrace.RTRL(), model, state, xs[0], targets[0])
    first = first_step_gradient(algorithm, model, state, xs[0], targets[0])
    assert relative_error(first, exact) <= 1e-12
    stepped = online_and_bptt(algorithm, model, xs, targets, state=state)[0]
    _, blocks, _, _ = online_in_blocks(algorithm, model, xs, targets, 2, state=state)
    assert relative_error(blocks, stepped) <= 1e-12


class KeepsStateDtype(eqtrace.AbstractCell):
    """Casts its new state to the state's dtype, so it takes a wider input than its weights."""

    op: eqx.nn.Linear
    decay: jax.Array

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 4, dtype=jnp.float32, key=key)
        self.decay = jnp.linspace(0.2, 0.8, 4, dtype=jnp.float32)

    def init_state(self):
        return jnp.zeros(4, jnp.float32)

    def __call__(self, state, x):
        h = (self.decay * state + jnp.tanh(self.op(x))).astype(state.dtype)
        return h, h


def test_a_float64_layer_feeding_a_float32_cell(getkey):
    """The analysis crashed on the float64 tangents of the float32 weights (jvp dtypes), and
    D-RTRL's block on the float64 op terms (scan carry dtypes)."""
    model = nn.Sequential([eqx.nn.Linear(3, 3, key=getkey()), KeepsStateDtype(key=getkey())])
    assert_first_step_equals_rtrl(model, getkey(), 3, tol=1e-5)
    xs, targets = jr.normal(getkey(), (3, 3)), jr.normal(getkey(), (3, 4))
    stepped, _ = online_and_bptt(eqtrace.DRTRL(), model, xs, targets)
    _, blocks, _, _ = online_in_blocks(eqtrace.DRTRL(), model, xs, targets, 2)
    assert relative_error(blocks, stepped) <= 1e-5


class ReLURNN(LeakyTanh):
    """`h' = relu(α ⊙ h + W x + b)`: each op output reaches its neuron only where the ReLU is
    active, about half the random draws the analysis makes (three draws left some outputs
    without an owner, and the traces credited them to neuron 0)."""

    def __call__(self, state, x):
        h = jax.nn.relu(self.decay * state + self.op(x))
        return h, h


@pytest.mark.parametrize("algorithm", EXACT_ELEMENTWISE)
def test_a_gated_op_output_finds_its_neuron(algorithm, getkey):
    model = nn.Sequential([ReLURNN(2, 8, key=getkey()), eqx.nn.Linear(8, 2, key=getkey())])
    xs, targets = jr.normal(getkey(), (4, 2)), jr.normal(getkey(), (4, 2))
    online, bptt = online_and_bptt(algorithm, model, xs, targets)
    assert relative_error(online, bptt) <= 1e-10


class Adaptive(eqtrace.AbstractCell):
    """`exp(-1/τ)` of a per-neuron τ, as neuron models write a decay: the analysis's random
    draws of τ near zero overflow, and the NaNs of `0 · inf` read as mixing (the cell was
    refused as mixing neurons, with `τ` acting on an op's input)."""

    op: eqx.nn.Linear
    tau: jax.Array
    gain: jax.Array

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 4, key=key)
        self.tau = jnp.linspace(2.0, 5.0, 4)
        self.gain = jnp.ones(4)

    def init_state(self):
        return jnp.zeros(4), jnp.zeros(4)

    def __call__(self, state, x):
        v, a = state
        v = jnp.exp(-1 / self.tau) * v + self.op(x) - 0.2 * a
        new_state = (v, 0.9 * a + jax.nn.sigmoid(v))
        return new_state, self.output(new_state)

    def output(self, state):
        return self.gain * jnp.tanh(state[0])


@pytest.mark.parametrize("algorithm", EXACT_ELEMENTWISE)
def test_a_decay_that_overflows_on_a_random_draw(algorithm, getkey):
    model = Adaptive(key=getkey())
    assert eqtrace.check(model, algorithm, jnp.zeros(3)).ok
    xs, targets = jr.normal(getkey(), (4, 3)), jr.normal(getkey(), (4, 4))
    online, bptt = online_and_bptt(algorithm, model, xs, targets)
    assert relative_error(online, bptt) <= 1e-10


class GatedPlusDirect(eqtrace.AbstractCell):
    """`h' = relu(α h + A x) + B x` with one neuron: `∂h/∂u` of the two calls agrees wherever
    the ReLU is on, which three random draws of one neuron all hit one time in eight (pp-prop
    then shared one output trace between the calls, a wrong gradient where the ReLU is off)."""

    a: eqx.nn.Linear
    b: eqx.nn.Linear
    decay: jax.Array

    def __init__(self, *, key):
        akey, bkey = jr.split(key)
        self.a = eqx.nn.Linear(5, 1, key=akey)
        self.b = eqx.nn.Linear(5, 1, key=bkey)
        self.decay = jnp.array([0.5])

    def init_state(self):
        return jnp.zeros(1)

    def __call__(self, state, x):
        h = jax.nn.relu(self.decay * state + self.a(x)) + self.b(x)
        return h, h


@pytest.mark.parametrize("rule", FIRST_STEP_RULES)
def test_calls_share_a_sensitivity_only_if_it_is_the_same(rule, getkey):
    model, x, target = GatedPlusDirect(key=getkey()), jr.normal(getkey(), (5,)), jnp.ones(1)
    state = jnp.array([-100.0])  # the ReLU is off: `A` gets no gradient, `B` does
    exact = first_step_gradient(eqtrace.RTRL(), model, state, x, target)
    assert relative_error(first_step_gradient(rule, model, state, x, target), exact) <= 1e-12


class HalfDecay(eqtrace.AbstractCell):
    """A float16 per-neuron decay and a shared float16 threshold in a float32 cell (the
    parameters' traces, created in float16, came out of a step in float32, and the scan over
    time refused the carry)."""

    op: eqx.nn.Linear
    tau: jax.Array
    threshold: jax.Array

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 4, key=key, dtype=jnp.float32)
        self.tau = jnp.linspace(2.0, 5.0, 4, dtype=jnp.float16)
        self.threshold = jnp.array(0.2, jnp.float16)

    def init_state(self):
        return jnp.zeros(4, jnp.float32)

    def __call__(self, state, x):
        h = jnp.exp(-1 / self.tau) * state + jnp.tanh(self.op(x) - self.threshold)
        return h.astype(jnp.float32), h.astype(jnp.float32)


@pytest.mark.parametrize("rule", STRUCTURAL)
def test_float16_parameters_outside_ops_of_a_float32_cell(rule, getkey):
    model = HalfDecay(key=getkey())
    xs = jr.normal(getkey(), (5, 3), jnp.float32)
    targets = jr.normal(getkey(), (5, 4), jnp.float32)
    online, bptt = online_and_bptt(rule, model, xs, targets)
    _, blocked, _, _ = online_in_blocks(rule, model, xs, targets, block_size=2)
    assert relative_error(blocked, online) <= 1e-2
    if not isinstance(rule, eqtrace.PPProp):  # exact on this element-wise cell
        assert relative_error(online, bptt) <= 1e-2


class MLPEncoder(eqtrace.AbstractCell):
    """An `eqx.nn.MLP` on `x` inside the cell: its layers are ops that reach the state only
    through the input of the cell's op (refused as "mixing after the op", which it is not)."""

    encoder: eqx.nn.MLP
    op: eqx.nn.Linear
    decay: jax.Array

    def __init__(self, *, key):
        ekey, okey = jr.split(key)
        self.encoder = eqx.nn.MLP(3, 5, width_size=6, depth=1, key=ekey)
        self.op = eqx.nn.Linear(5, 4, key=okey)
        self.decay = jnp.linspace(0.2, 0.8, 4)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, x):
        h = self.decay * state + jnp.tanh(self.op(self.encoder(x)))
        return h, h


def test_an_op_that_feeds_another_op_is_refused_naming_the_way_out(getkey):
    report = str(eqtrace.check(MLPEncoder(key=getkey()), eqtrace.DRTRL(), jnp.zeros(3)))
    assert "`.encoder.layers[0]` reaches the state only through the input of another op" in report
    assert "belongs before the cell, in `eqtrace.nn.Sequential`" in report


class CondGate(eqtrace.AbstractCell):
    """A leaky layer whose update passes through a `lax.cond` on its previous state."""

    op: eqx.nn.Linear

    def __init__(self, *, key):
        self.op = eqx.nn.Linear(3, 4, key=key)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        v = 0.5 * h + jnp.tanh(self.op(x))
        v = jax.lax.cond(jnp.sum(h) > 0, lambda v: v, lambda v: 0.5 * jnp.tanh(v), v)
        return v, v


@pytest.mark.parametrize(
    "rule", algorithms(needs_structure=True, exact=False)[: None if LONG else 1]
)
def test_a_cond_gate_above_a_layer(rule, getkey):
    """A `lax.cond` on the state, above a layer that gets input credit: JAX's batching of a
    cond in a JVP (a select of `stop_gradient`ed tangents) cannot be transposed, so the input
    tangent is formed from the Jacobian for such cells. Blocks equal steps, a batch equals its
    samples, and D-RTRL equals BPTT on the gated cell's own weights (the cond's predicate has
    no derivative; the layer below gets credit within each step only)."""
    model = nn.Sequential([eqx.nn.Linear(3, 3, key=getkey()), CondGate(key=getkey())])
    xs, targets = jr.normal(getkey(), (2, 4, 3)), jr.normal(getkey(), (2, 4, 4))
    steps, bptt = online_and_bptt(rule, model, xs[0], targets[0])
    _, blocks, _, _ = online_in_blocks(rule, model, xs[0], targets[0], block_size=2)
    assert relative_error(blocks, steps) <= 1e-10
    if isinstance(rule, eqtrace.DRTRL):
        assert relative_error(steps.layers[1], bptt.layers[1]) <= 1e-10
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, rule, batch_size=2)
    step = jax.vmap(eqtrace.make_online_step(rule, static), in_axes=(None, 0, 0, 0))
    _, batched, _, _ = eqtrace.online_gradient(
        step,
        squared_loss,
        params,
        state,
        trace,
        jnp.swapaxes(xs, 0, 1),
        jnp.swapaxes(targets, 0, 1),
        reduction="sum",
    )
    per_sample = jax.tree.map(
        jnp.add, *(online_and_bptt(rule, model, xs[i], targets[i])[0] for i in range(2))
    )
    assert relative_error(batched, per_sample) <= 1e-10
