"""`LowRankRTRL`: D-RTRL's (or SnAp-1's) trace plus a rank-r correction. Its oracles, in
float64 on tiny cells through the step-by-step trace path: at rank 0 it is the base rule; at
full rank (r = the number of state values) it is exact RTRL over several steps, and so BPTT
under a stateless read-out; the error to RTRL falls with the rank; its first step is its
base rule's, exactly (the correction starts at zero), which is why the first-step products
over cells and op kinds run the base rule (`first_step_as` in `registry.py`). (Blocks =
steps, batch = per sample, jit = no jit and RTRL at the first step run through
`registry.py`.)"""

import equinox as eqx
import jax
import jax.random as jr
import pytest

import eqtrace
from eqtrace import nn
from helpers import LONG, online_and_bptt, relative_error
from registry import make_cell
from test_any_cell import VJPSpiking, first_step_gradient


LENGTH = 5


def _problem(name, key, hidden=3):
    model = make_cell(name, jr.fold_in(key, 0), input_size=2, hidden_size=hidden)
    model = nn.Sequential([model, eqx.nn.Linear(hidden, 2, key=jr.fold_in(key, 1))])
    xs = jr.normal(jr.fold_in(key, 2), (LENGTH, 2))
    targets = jr.normal(jr.fold_in(key, 3), (LENGTH, 2))
    return model, xs, targets


def _online(rule, model, xs, targets):
    return online_and_bptt(rule, model, xs, targets)[0]


def _state_size(model, xs):
    return sum(leaf.size for leaf in jax.tree.leaves(model.layers[0].init_state()))


@pytest.mark.parametrize(
    "name, base",
    [
        pytest.param("rnn", eqtrace.SnAp1(), id="rnn-snap1"),
        pytest.param("alif", eqtrace.DRTRL(), id="alif-drtrl"),
        # Each base on another cell under `LONG`.
        *(
            [
                pytest.param("gru", eqtrace.DRTRL(), id="gru-drtrl"),
                pytest.param("alif", eqtrace.SnAp1(), id="alif-snap1"),
            ]
            if LONG
            else []
        ),
    ],
)
def test_full_rank_is_rtrl_and_rank_zero_the_base(name, base, getkey):
    model, xs, targets = _problem(name, getkey())
    full = _state_size(model, xs)
    online, bptt = online_and_bptt(eqtrace.LowRankRTRL(full, base), model, xs, targets)
    assert relative_error(online, bptt) <= 1e-10
    # The base rule misses part of the gradient, which the correction restores.
    assert relative_error(_online(base, model, xs, targets), bptt) > 1e-3
    # A rank above the state's is capped at it.
    above = _online(eqtrace.LowRankRTRL(full + 3, base), model, xs, targets)
    assert relative_error(above, bptt) <= 1e-10
    rank_zero = _online(eqtrace.LowRankRTRL(0, base), model, xs, targets)
    assert relative_error(rank_zero, _online(base, model, xs, targets)) == 0.0


@pytest.mark.parametrize("name", ["rnn", "gru"])
def test_the_error_falls_with_the_rank(name, getkey):
    """On random cells (4 neurons, 4 state values) the error to RTRL falls strictly from the
    base rule (rank 0) to zero (rank 4); measured on larger cells by
    `benchmarks/rank_curve.py`."""
    model, xs, targets = _problem(name, getkey(), hidden=4)
    bptt = online_and_bptt(eqtrace.RTRL(), model, xs, targets)[1]
    errors = [
        relative_error(_online(eqtrace.LowRankRTRL(r), model, xs, targets), bptt) for r in range(5)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] <= 1e-10


def test_the_trace_and_what_check_says(getkey):
    model, xs, _ = _problem("gru", getkey())
    rule = eqtrace.LowRankRTRL(2)
    size = eqtrace.trace_size(rule, model, xs[0]).values
    base = eqtrace.trace_size(eqtrace.DRTRL(), model, xs[0]).values
    params = sum(a.size for a in jax.tree.leaves(eqx.filter(model.layers[0], eqx.is_array)))
    assert size == base + 2 * (3 + params)  # r (|h| + |θ|) on top of the base rule's
    report = eqtrace.check(model, rule, x=xs[0])
    assert report.ok
    assert "rank-2 correction to DRTRL's trace (the cell has 3 state values)" in str(report)
    assert "exact RTRL" in str(eqtrace.check(model, eqtrace.LowRankRTRL(3), x=xs[0]))


def test_the_base_rules_refusals_and_options(getkey):
    """The base rule's `strict` is the rule's; its refusals are raised as its own."""
    rule = eqtrace.LowRankRTRL(2, eqtrace.SnAp1(strict=False))
    assert not rule.strict and eqtrace.LowRankRTRL(2).strict
    assert rule.relaxed().base == eqtrace.SnAp1(strict=False)
    assert not eqtrace.LowRankRTRL(2).relaxed().strict


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=-1), "`rank` must be an integer ≥ 0"),
        (dict(rank=True), "`rank` must be an integer ≥ 0"),
        (dict(iterations=0), "`iterations` must be an integer ≥ 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eqtrace.LowRankRTRL(**kwargs)


def test_more_iterations_stay_exact_at_full_rank(getkey):
    model, xs, targets = _problem("gru", getkey())
    online, bptt = online_and_bptt(eqtrace.LowRankRTRL(3, iterations=2), model, xs, targets)
    assert relative_error(online, bptt) <= 1e-10


def test_its_first_step_is_its_base_rules(getkey):
    model, xs, targets = _problem("lstm", getkey())
    state = jax.tree.map(lambda s: s + 0.2, model.init_state())
    # (Whatever the base rule: the correction is zero until the first step has run.)
    first = first_step_gradient(eqtrace.LowRankRTRL(2), model, state, xs[0], targets[0])
    base = first_step_gradient(eqtrace.DRTRL(), model, state, xs[0], targets[0])
    assert relative_error(first, base) == 0


def test_a_custom_vjp_cell_is_refused_by_name(getkey):
    """The correction is propagated forward (`J_t U`): a `custom_vjp` on the state's path is
    refused at `init_trace`, as by UORO, while rank 0 (the base rule) runs it."""
    model = VJPSpiking(key=getkey())
    x = jr.normal(getkey(), (3,))
    with pytest.raises(ValueError, match="LowRankRTRL cannot run VJPSpiking"):
        eqtrace.LowRankRTRL(2).init_trace(model, model.init_state(), x)
    eqtrace.LowRankRTRL(0).init_trace(model, model.init_state(), x)
