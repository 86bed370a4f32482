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
from helpers import LONG, relative_error
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
BAND_CASES = [(*gate, 4) for gate in GATES] + [("clip", 0.975, 16)]
BAND_CASES += [("triangle", 1.01, 16)] if LONG else []


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


class AdaptiveRefractory(eqtrace.AbstractCell):
    """An ALIF as researchers write it: an adaptive threshold leaf, a refractory counter held
    as a float leaf (`jnp.where(ref > 0, …)`), a detached reset and a spike leaf fed back
    through a recurrent op."""

    inp: eqx.nn.Linear
    rec: eqx.nn.Linear
    beta: jax.Array

    def __init__(self, *, key):
        k1, k2 = jr.split(key)
        self.inp = eqx.nn.Linear(3, 4, key=k1)
        self.rec = eqx.nn.Linear(4, 4, use_bias=False, key=k2)
        self.beta = jnp.linspace(0.1, 0.4, 4)

    def init_state(self):
        return (jnp.zeros(4),) * 4

    def __call__(self, state, x):
        v, a, ref, s = state
        threshold = 0.5 + self.beta * a
        v = jnp.where(ref > 0, 0.0, 0.9 * v + self.inp(x) + self.rec(s))
        v = v - jax.lax.stop_gradient(s) * threshold
        s = surrogate.triangle(v - threshold, width=0.3)
        ref = jnp.where(s > 0, 2.0, jnp.maximum(ref - 1.0, 0.0))
        new_state = (v, 0.95 * a + s, ref, s)
        return new_state, self.output(new_state)

    def output(self, state):
        return state[3]


class MaskedRaw(eqtrace.AbstractCell):
    """Raw recurrent weights (small shared parameters) under a boolean mask that keeps the
    diagonal, applied both ways researchers write it: `jnp.where(mask, w, 0)` and
    `v * mask.astype(v.dtype)`. The product is element-wise only through the mask's values."""

    inp: eqx.nn.Linear
    w: jax.Array
    v: jax.Array
    mask: jax.Array

    def __init__(self, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.inp = eqx.nn.Linear(3, 4, key=k1)
        self.w, self.v = jr.normal(k2, (4, 4)) / 3, jr.normal(k3, (4, 4)) / 3
        self.mask = jnp.eye(4, dtype=bool)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        w = jnp.where(self.mask, self.w, 0.0) + self.v * self.mask.astype(self.v.dtype)
        h = 0.8 * h + jnp.tanh(self.inp(x) + w @ jnp.tanh(h))
        return h, h


class Routed(eqtrace.AbstractCell):
    """Op outputs routed to the neurons by constant index tables: a permutation (`jnp.take`
    and fancy indexing), `jax.ops.segment_sum` with constant segment ids, a pair-wise
    `jnp.einsum`, `jnp.roll`; each output still reaches one neuron."""

    inp: eqx.nn.Linear
    rec: eqx.nn.Linear
    perm: jax.Array
    segments: jax.Array
    route: str = eqx.field(static=True)

    def __init__(self, route, *, key):
        k1, k2 = jr.split(key)
        self.inp = eqx.nn.Linear(3, 8, key=k1)
        self.rec = eqx.nn.Linear(4, 8, key=k2)
        self.perm = jnp.array([5, 2, 7, 0, 1, 3, 6, 4])
        self.segments = jnp.array([3, 0, 2, 1, 0, 1, 3, 2])
        self.route = route

    def init_state(self):
        return jnp.zeros(4)

    def to_neurons(self, u):
        if self.route == "take":
            return jnp.take(u, self.perm)[:4] * u[self.perm][4:]
        if self.route == "segment":
            return jax.ops.segment_sum(u, self.segments, num_segments=4)
        if self.route == "einsum":
            return jnp.einsum("nk,k->n", u.reshape(4, 2), jnp.array([0.5, -1.0]))
        return jnp.roll(u, 3)[:4]

    def __call__(self, h, x):
        u = self.to_neurons(self.inp(x)) + self.to_neurons(self.rec(jnp.tanh(h)))
        h = 0.7 * h + jnp.tanh(u)
        return h, h


class FusedLSTM(eqtrace.AbstractCell):
    """An LSTM written with one fused `Linear` on `[x, h]` producing every gate, then
    `jnp.split`."""

    gates: eqx.nn.Linear

    def __init__(self, *, key):
        self.gates = eqx.nn.Linear(3 + 4, 16, key=key)

    def init_state(self):
        return jnp.zeros(4), jnp.zeros(4)

    def __call__(self, state, x):
        h, c = state
        i, f, g, o = jnp.split(self.gates(jnp.concatenate([x, h])), 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), self.output((h, c))

    def output(self, state):
        return state[0]


AUDITED = {
    "alif-refractory": (
        lambda k: AdaptiveRefractory(key=k),
        (
            jnp.array([0.2, 0.6, 0.4, 0.7]),
            jnp.array([0.1, 0, 0.3, 0]),
            jnp.eye(4)[1],
            jnp.eye(4)[3],
        ),
    ),
    "masked-raw": (lambda k: MaskedRaw(key=k), jnp.linspace(-1, 1, 4)),
    "take": (lambda k: Routed("take", key=k), jnp.linspace(-1, 1, 4)),
    "segment-sum": (lambda k: Routed("segment", key=k), jnp.linspace(-1, 1, 4)),
    "einsum": (lambda k: Routed("einsum", key=k), jnp.linspace(-1, 1, 4)),
    "fused-lstm": (lambda k: FusedLSTM(key=k), (jnp.linspace(-1, 1, 4), jnp.linspace(1, -1, 4))),
}


#: By default the cell whose structure needs the supports of masked weights; all under `LONG`.
AUDITED_DEFAULT = ["masked-raw"]


@pytest.mark.parametrize("name", list(AUDITED) if LONG else AUDITED_DEFAULT)
def test_cells_from_an_audit(name, getkey):
    make, state = AUDITED[name]
    assert_each_rule_exact(make(getkey()), state, jnp.array([0.5, -0.3, 0.8]))


class Normed(eqtrace.AbstractCell):
    """A layer norm of the drive, or a top-k of it: each op output reaches every neuron."""

    inp: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    kind: str = eqx.field(static=True)

    def __init__(self, kind, *, key):
        self.inp = eqx.nn.Linear(3, 4, key=key)
        self.norm = eqx.nn.LayerNorm(4)
        self.kind = kind

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        u = self.inp(x)
        if self.kind == "norm":
            u = self.norm(u)
        else:
            values, indices = jax.lax.top_k(u, 2)
            u = jnp.zeros(4).at[indices].set(values)
        h = 0.8 * h + jnp.tanh(u)
        return h, h


@pytest.mark.parametrize("kind", ["norm", "top-k"])
def test_a_layer_norm_or_top_k_of_the_drive_is_refused(kind, getkey):
    assert_refused(Normed(kind, key=getkey()), jnp.ones(3), match="reaches 4 neurons")


def test_traced_masks_are_named_with_the_fix(getkey):
    """Under `eqx.filter_jit(rule.step)` a cell's integer and boolean arrays are traced: the
    plan prepared there cannot read a mask, so the masked weights read as mixing the neurons
    (D-RTRL refused the cell that `init_trace` had accepted) or SnAp-n's pattern widens (its
    trace laid out otherwise than `init_trace`'s, as for `nn.LIF(recurrent_mask=...)`). Both
    errors blamed the cell or the trace; they name the arrays and the fix, and the fix (a
    plan prepared outside `jit`) gives the step's own result."""
    model, x = MaskedRaw(key=getkey()), jnp.array([0.5, -0.3, 0.8])
    state = jnp.linspace(-1, 1, 4)
    for rule in [eqtrace.DRTRL(), eqtrace.SnAp(2)]:
        trace = rule.init_trace(model, state, x)
        with pytest.raises(ValueError, match="The integer or boolean arrays `.mask` of MaskedRaw"):
            eqx.filter_jit(rule.step)(model, state, trace, x)
        plan = eqtrace.prepare(rule, model, x)
        jitted = eqx.filter_jit(rule.step)(model, state, trace, x, plan=plan)
        assert relative_error(jitted, rule.step(model, state, trace, x)) <= 1e-12
