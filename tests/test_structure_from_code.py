"""The structure analysis reads dependences from the code of a cell, never from sampled
values: each cell here hides a dependence from random draws (a narrow band, a regime, a
known-valued integer or boolean field, a narrow surrogate) and got a silently wrong gradient
while `check` said "structure: OK" when the structure was guessed from random Jacobians.

Each is held, from a state inside its band, to exact RTRL at the first step under every
diagonal rule, or refused with `eqtrace.StructureError` where the structure is outside them."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

import eqtrace
from eqtrace import nn
from eqtrace._structure import _analyse
from eqtrace.nn import surrogate
from helpers import relative_error
from registry import rules
from test_any_cell import RawWeightUse, first_step_gradient


#: (A rule whose first step is another's, `first_step_as`, is that rule here.)
DIAGONAL = [case.algorithm for case in rules(needs_structure=True, exact=False, first_step_as=None)]
#: Rules that refuse a `custom_vjp` cell by name (they differentiate it in forward mode).
FORWARD_MODE = tuple(type(case.algorithm) for case in rules(forward_mode=True))


def assert_each_rule_exact(model, state, x, *, tol=1e-10):
    target = jnp.full(jax.eval_shape(model, state, x)[1].shape, 1.7)  # not a spike's value
    exact = first_step_gradient(eqtrace.RTRL(), model, state, x, target)
    # The dependence is there: RTRL's gradient reaches every op's weights.
    assert max(float(jnp.max(jnp.abs(g))) for g in jtu.tree_leaves(exact)) > 0
    for rule in DIAGONAL:
        try:
            received = first_step_gradient(rule, model, state, x, target)
        except ValueError as refusal:
            assert isinstance(rule, FORWARD_MODE) and "custom_vjp" in str(refusal), refusal
            continue
        assert relative_error(received, exact) <= tol, rule
    assert eqtrace.check(model, x=x).ok


def assert_refused(model, x, *, match):
    for rule in DIAGONAL:
        with pytest.raises(eqtrace.StructureError, match=match):
            rule.init_trace(model, model.init_state(), x)
    assert not eqtrace.check(model, x=x).ok


class Gated(eqtrace.AbstractCell):
    """`h = 0.9 h + gate(u)` with `u = inp(x) + rec(tanh h)`, biased to `centre` with small
    weights, so that `u` lies inside the gate's band for any state."""

    inp: eqx.nn.Linear
    rec: eqx.nn.Linear
    gate: str = eqx.field(static=True)

    def __init__(self, gate, centre, *, key, n=4):
        k1, k2 = jr.split(key)

        def small(layer):
            return eqx.tree_at(lambda m: m.weight, layer, layer.weight * 1e-3)

        self.inp = small(eqx.nn.Linear(3, n, key=k1))
        self.inp = eqx.tree_at(lambda m: m.bias, self.inp, jnp.full(n, centre))
        self.rec = small(eqx.nn.Linear(n, n, use_bias=False, key=k2))
        self.gate = gate

    def init_state(self):
        return jnp.zeros(self.rec.out_features)

    def __call__(self, h, x):
        u = self.inp(x) + self.rec(jnp.tanh(h))
        if self.gate == "clip":
            g = jnp.clip(u, 0.95, 1.0)
        elif self.gate == "clip-far":
            g = jnp.clip(u, 2.0, 2.1)
        elif self.gate == "window":
            g = jnp.where((u > 1.0) & (u < 1.05), u, 0.0)
        elif self.gate == "hard-sigmoid":
            g = jnp.clip(0.2 * (u - 3.0) + 0.5, 0.0, 1.0)
        elif self.gate == "burst":
            g = jnp.where(u > 6.0, 2 * jnp.tanh(u), 0.0)
        else:
            g = surrogate.triangle(u - 1.0, width=0.05)
        h = 0.9 * h + g
        return h, h


GATES = [
    ("clip", 0.975),
    ("clip-far", 2.05),
    ("window", 1.025),
    ("hard-sigmoid", 3.5),
    ("burst", 6.5),
    ("triangle", 1.01),
]


#: Each gate with 4 neurons; two with 16 too (the answer must not depend on the layer size).
BAND_CASES = [(*gate, 4) for gate in GATES] + [("clip", 0.975, 16), ("triangle", 1.01, 16)]


@pytest.mark.parametrize("gate,centre,n", BAND_CASES, ids=[f"{g}-{n}" for g, _, n in BAND_CASES])
def test_narrow_bands(gate, centre, n, getkey):
    model = Gated(gate, centre, key=getkey(), n=n)
    assert_each_rule_exact(model, jnp.full(n, 0.1), jnp.ones(3))


class Dale(eqtrace.AbstractCell):
    """Integer signs (Dale's law), a boolean enable mask and an integer fan-in divisor."""

    inp: eqx.nn.Linear
    rec: eqx.nn.Linear
    sign: jax.Array
    enabled: jax.Array
    fan_in: jax.Array

    def __init__(self, *, key):
        k1, k2 = jr.split(key)
        self.inp = eqx.nn.Linear(3, 4, key=k1)
        self.rec = eqx.nn.Linear(4, 4, key=k2)
        self.sign = jnp.array([1, -1, 1, -1])
        self.enabled = jnp.array([True, False, True, True])
        self.fan_in = jnp.array(3)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        drive = self.sign * self.inp(x) / self.fan_in
        h = 0.8 * h + jnp.tanh(drive + jnp.where(self.enabled, self.rec(jnp.tanh(h)), 0.0))
        return h, h


def test_integer_and_boolean_fields_at_their_values(getkey):
    model = Dale(key=getkey())
    assert_each_rule_exact(model, jnp.linspace(-1, 1, 4), jnp.ones(3))


class Refractory(eqtrace.AbstractCell):
    """A refractory counter held as a float state leaf: integration only where `ref == 0`
    (every neuron at the initial state), a padding flag in the input."""

    inp: eqx.nn.Linear
    rec: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2 = jr.split(key)
        self.inp = eqx.nn.Linear(3, 4, key=k1)
        self.rec = eqx.nn.Linear(4, 4, key=k2)

    def init_state(self):
        return (jnp.zeros(4), jnp.zeros(4))

    def __call__(self, state, x):
        v, ref = state
        spike = surrogate.triangle(v - 1.0, width=0.05)
        drive = self.inp(x) + self.rec(spike)
        v_new = jnp.where(ref == 0, 0.9 * v + drive, 0.0)
        v_new = jnp.where(x[-1] == 1.0, v, v_new)  # a padding step changes nothing
        ref_new = jnp.where(v_new > 1.0, 2.0, jnp.maximum(ref - 1.0, 0.0))
        return (v_new, ref_new), v_new

    def output(self, state):
        return state[0]


def test_regimes_from_the_initial_state(getkey):
    model = Refractory(key=getkey())
    assert_each_rule_exact(model, model.init_state(), jnp.array([0.5, -0.2, 0.0]))


class Capped(eqtrace.AbstractCell):
    """A learnable cap (`clip(u, 0, cap)`) and a square root of non-negative inputs."""

    inp: eqx.nn.Linear
    cap: jax.Array

    def __init__(self, *, key):
        self.inp = eqx.nn.Linear(3, 4, key=key)
        self.cap = jnp.full(4, 0.01)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        h = 0.9 * h + jnp.clip(self.inp(jnp.sqrt(x)) + 1.0, 0.0, self.cap)
        return h, h


def test_learnable_cap_and_square_root(getkey):
    model = Capped(key=getkey())
    assert_each_rule_exact(model, jnp.zeros(4), jnp.array([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("size", [8, 16])
def test_lif_with_a_narrow_surrogate_is_accepted_whatever_its_size(size, getkey):
    model = nn.LIF(3, size, surrogate=surrogate.Triangle(width=0.05), key=getkey())
    # Below threshold (no reset), the membrane decays to 0.95 and the input adds 0.05: the
    # new membrane lies inside the surrogate's band.
    weight = model.input_op.weight
    model = eqx.tree_at(lambda m: m.input_op.weight, model, 0.05 / 3 + 1e-4 * weight)
    v = jnp.full(size, 0.999)
    assert_each_rule_exact(model, (v,), jnp.ones(3))


class DelayTable(eqtrace.AbstractCell):
    """Per-neuron integer delays choosing among buffered inputs (a delay line in the state)."""

    inp: eqx.nn.Linear
    delays: jax.Array

    def __init__(self, *, key):
        self.inp = eqx.nn.Linear(3, 4, key=key)
        self.delays = jnp.array([1, 2, 1, 2])

    def init_state(self):
        return (jnp.zeros(4), jnp.zeros(4), jnp.zeros(4))

    def __call__(self, state, x):
        h, d1, d2 = state
        u = self.inp(x)
        delayed = jnp.where(self.delays == 1, d1, jnp.where(self.delays == 2, d2, 0.0))
        h = 0.9 * h + jnp.tanh(delayed)
        return (h, u, d1), h

    def output(self, state):
        return state[0]


def test_integer_delay_tables(getkey):
    model = DelayTable(key=getkey())
    state = (jnp.zeros(4), jnp.linspace(-1, 1, 4), jnp.linspace(1, -1, 4))
    x = jnp.ones(3)
    # One step reaches `h` only through the delay buffers: the weights' gradient is zero at
    # T = 1 for every rule, so this checks the structure is accepted and equal to RTRL.
    target = jnp.ones(4)
    exact = first_step_gradient(eqtrace.RTRL(), model, state, x, target)
    for rule in DIAGONAL:
        assert relative_error(first_step_gradient(rule, model, state, x, target), exact) <= 1e-10
    assert eqtrace.check(model, x=x).ok


class NormClip(eqtrace.AbstractCell):
    """A couplings that appear only above a threshold: a norm clip, or a `lax.cond`
    renormalisation of the whole state."""

    inp: eqx.nn.Linear
    kind: str = eqx.field(static=True)

    def __init__(self, kind, *, key):
        self.inp = eqx.nn.Linear(3, 4, key=key)
        self.kind = kind

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        h = 0.9 * h + jnp.tanh(self.inp(x))
        norm = jnp.sqrt(jnp.sum(h**2))
        if self.kind == "where":
            h = jnp.where(norm > 10.0, h * 10.0 / norm, h)
        else:
            h = jax.lax.cond(jnp.sum(h) > 10.0, lambda h: h / jnp.sum(h), lambda h: h, h)
        return h, h


@pytest.mark.parametrize("kind", ["where", "cond"])
def test_couplings_in_some_regimes_are_refused(kind, getkey):
    assert_refused(NormClip(kind, key=getkey()), jnp.ones(3), match="depends on other neurons")


class SharedThreshold(eqtrace.AbstractCell):
    """snnTorch's `Leaky` with a learnable threshold, in the reset and in the spike."""

    inp: eqx.nn.Linear
    threshold: jax.Array

    def __init__(self, *, key):
        self.inp = eqx.nn.Linear(3, 4, key=key)
        self.threshold = jnp.ones(4)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, v, x):
        reset = jax.lax.stop_gradient(surrogate.triangle(v - self.threshold)) * self.threshold
        v = 0.9 * v + self.inp(x) - reset
        return v, self.output(v)

    def output(self, v):
        return surrogate.triangle(v - self.threshold)


def test_eprop_refuses_a_parameter_in_the_output_and_the_state_under_a_leaky_readout(getkey):
    model = nn.Sequential(
        [SharedThreshold(key=getkey()), nn.LeakyReadout(4, 2, tau=5.0, key=getkey())]
    )
    with pytest.raises(eqtrace.StructureError, match="threshold"):
        eqtrace.EProp().init_trace(model, model.init_state(), jnp.ones(3))


@pytest.mark.parametrize(
    "model", [lambda k: nn.GRUCell(3, 8, key=k), lambda k: Dale(key=k), lambda k: Refractory(key=k)]
)
def test_the_analysis_does_not_depend_on_values(model, getkey):
    """The same structure for different example inputs, states and parameter values."""
    cell = model(getkey())
    structures = []
    for seed in range(3):
        key = jr.key(seed)
        params, static = eqx.partition(cell, eqx.is_inexact_array)
        drawn = jtu.tree_map(lambda p: jr.normal(key, p.shape, p.dtype) * 10.0**seed, params)
        state = jtu.tree_map(lambda s: jr.normal(key, s.shape, s.dtype), cell.init_state())
        x = jr.normal(key, (3,)) * 10.0**seed
        structures.append(_analyse(eqx.combine(drawn, static), state, x))
    for other in structures[1:]:
        assert repr(other) == repr(structures[0])


def test_masks_of_one_shape_give_their_own_structures(getkey):
    """The analysis reads boolean fields at their values, so its cache tells masks apart: an
    all-false enable mask leaves the recurrent op untraced, an all-true one must not."""
    off = Dale(key=getkey())
    off = eqx.tree_at(lambda c: c.enabled, off, jnp.zeros(4, bool))
    on = eqx.tree_at(lambda c: c.enabled, off, jnp.ones(4, bool))
    state, x = jnp.linspace(-1, 1, 4), jnp.ones(3)
    for rule in DIAGONAL:
        rule.init_trace(off, state, x)  # analysed (and cached) first
    assert_each_rule_exact(on, state, x)


class GainEverywhere(eqtrace.AbstractCell):
    """A shared gain that scales the drive and also the input of an op: its path through the
    op's input reaches the same neurons as its direct one, so no pattern of the state shows
    it (found by the long hypothesis profile: D-RTRL was 9e-4 off)."""

    inp: eqx.nn.Linear
    gain: jax.Array

    def __init__(self, *, key):
        self.inp = eqx.nn.Linear(3, 4, key=key)
        self.gain = jnp.array(1.3)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        h = 0.9 * h + self.gain * jnp.tanh(self.inp(self.gain * x))
        return h, h


class Chained(eqtrace.AbstractCell):
    """One op's output feeds a diagonal (masked) op's input: every output still reaches one
    neuron, but the path through the second op's input is cut by the rules."""

    first: eqx.nn.Linear
    second: nn.Linear

    def __init__(self, *, key):
        k1, k2 = jr.split(key)
        self.first = eqx.nn.Linear(3, 4, key=k1)
        self.second = nn.Linear(4, 4, key=k2, mask=jnp.eye(4, dtype=bool))

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        u = self.first(x)
        h = 0.9 * h + u + self.second(jnp.tanh(u))
        return h, h


def test_a_path_through_an_op_input_hidden_by_a_direct_one_is_refused(getkey):
    assert_refused(
        GainEverywhere(key=getkey()),
        jnp.ones(3),
        match="`.gain` acts on the input of a synaptic op",
    )
    assert_refused(
        Chained(key=getkey()), jnp.ones(3), match="the output of the op `.first` acts on the input"
    )


class SkipWeight(eqtrace.AbstractCell):
    """A raw weight in a skip connection, `y = h + w @ x`: `output` reads no weight, so the
    returned `y` is not `output(new_state)`."""

    inp: eqx.nn.Linear
    w: jax.Array

    def __init__(self, *, key):
        self.inp = eqx.nn.Linear(3, 4, key=key)
        self.w = jnp.ones((4, 3))

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        h = jnp.tanh(0.9 * h + self.inp(x))
        return h, h + self.w @ x


@pytest.mark.parametrize(
    "cell_cls, n_in, subject",
    [
        (SkipWeight, 3, ".w"),
        (GainEverywhere, 3, ".gain"),
        (RawWeightUse, 4, ".op"),
        (Chained, 3, ".first"),
    ],
)
def test_check_never_calls_covered_what_a_violation_is_about(cell_cls, n_in, subject, getkey):
    """The line on an op or parameter that a violation is about points to the violation and
    claims no trace: `.w` once read "does not reach the state, exact gradient through
    `output`" beside the violation its skip connection causes, `.gain` "shared, dense trace"
    beside the path its trace misses."""
    report = eqtrace.check(cell_cls(key=getkey()), eqtrace.DRTRL(strict=False), x=jnp.ones(n_in))
    assert not report.ok
    starts = (f"    parameter {subject} ", f"    synaptic op {subject} ")
    (line,) = [line for line in str(report).splitlines() if line.startswith(starts)]
    claim, _, pointer = line.partition("see VIOLATION below: ")
    assert pointer, line
    assert "exact" not in claim and "trace" not in claim, line
    # With a `y` other than `output(new_state)`, nothing is exact through `output`.
    if cell_cls is SkipWeight:
        assert pointer == str(eqtrace.ViolationKind.OUTPUT_NOT_OF_STATE)
        assert "exact gradient through `output`" not in str(report)


class PositiveLinear(eqx.Module):
    """A user op with positive weights, `softplus(raw) @ a`: not linear in its array."""

    raw: jax.Array

    def __call__(self, a):
        return jax.nn.softplus(self.raw) @ a


eqtrace.register_op(PositiveLinear)


class FromIndependentReviews(eqtrace.AbstractCell):
    """Cells from an independent trial: a `custom_vjp` spike with a shared threshold (the
    dense trace of a shared parameter fell back to reverse mode), gates split with
    `jnp.unstack` (its pullback is the `stack` primitive), and an op that is not linear in
    its weights (`PositiveLinear`)."""

    inp: eqx.nn.Linear
    rec: eqx.Module
    threshold: jax.Array
    kind: str = eqx.field(static=True)

    def __init__(self, kind, *, key):
        k1, k2 = jr.split(key)
        self.kind = kind
        self.inp = eqx.nn.Linear(3, 8, key=k1)
        self.rec = (
            PositiveLinear(jr.normal(k2, (8, 4)))
            if kind == "positive"
            else eqx.nn.Linear(4, 8, key=k2)
        )
        self.threshold = jnp.array(0.5)

    def init_state(self):
        return jnp.zeros(4), jnp.zeros(4)

    def output(self, state):
        return state[1]

    def __call__(self, state, x):
        v, z = state
        drive = self.inp(x) + self.rec(jnp.tanh(v))
        gate, current = jnp.unstack(drive.reshape(2, 4))
        v = jax.nn.sigmoid(gate) * v + current - 0.5 * z
        z = _vjp_spike(v - self.threshold)
        return (v, z), z


@jax.custom_vjp
def _vjp_spike(v):
    return (v > 0).astype(v.dtype)


_vjp_spike.defvjp(lambda v: (_vjp_spike(v), v), lambda v, g: (g / (1 + 10 * jnp.abs(v)) ** 2,))


def test_cells_from_an_independent_trial(getkey):
    cell = FromIndependentReviews("dense", key=getkey())
    state = (jnp.array([0.4, 0.6, 0.2, 0.55]), jnp.array([0.0, 1.0, 0.0, 1.0]))
    assert_each_rule_exact(cell, state, jr.normal(getkey(), (3,)))
    positive = FromIndependentReviews("positive", key=getkey())
    for rule in (eqtrace.DRTRL(), eqtrace.SnAp1(), eqtrace.EProp()):
        with pytest.raises(eqtrace.StructureError, match="not linear in its weights"):
            rule.init_trace(positive, positive.init_state(), jnp.ones(3))
