"""Exact windows (`eqtrace.ExactWindows`), run through the block drivers in float64: a window
of the whole sequence is BPTT for every rule, a window of one step is the rule's stepping,
D-RTRL's windows are BPTT on element-wise layers, and any window equals the definition
written out naively (the rule's step into the window, then the cell unrolled in Python)."""

import os

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import eqtrace
from eqtrace import nn
from helpers import LONG, normal, random_sequence, random_state, relative_error, squared_loss
from registry import ALGORITHMS, TRACE_KINDS, algorithm_cases, make_cell


INPUT, BATCH = 3, 2


def _stack(key):
    """Two recurrent (not element-wise) layers: credit from the second to the first, and in
    time within each, inside a window."""
    k1, k2 = jr.split(key)
    return nn.Sequential([nn.GRUCell(INPUT, 3, key=k1), nn.RNNCell(3, 2, key=k2)])


def _problem(model, rng, length, batch=()):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    xs, targets = random_sequence(rng, model, length, INPUT, batch)
    return params, static, xs, targets


def _batch_loss(y, target):
    return squared_loss(y, target) / BATCH


def _windows(rule, static, params, state, trace, xs, targets, k, batched=False):
    block = eqtrace.make_online_block(eqtrace.ExactWindows(rule), static)
    loss_fn = squared_loss
    if batched:
        block = jax.vmap(block, in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1))
        loss_fn = _batch_loss
    return eqtrace.online_gradient(
        block, loss_fn, params, state, trace, xs, targets, block_size=k, reduction="sum"
    )


@eqx.filter_jit
def _reference_window(rule, static, params, state, trace, xs, targets):
    """The loss and gradient of one window by its definition, unrolled in Python: the rule's
    online step into the window (`step`, whose parameter derivative is the rule's trace),
    then the model itself, differentiated exactly; and the state and trace after the window,
    by stepping the rule."""

    def loss(params):
        model = eqx.combine(params, static)
        h, _, y = rule.step(model, state, trace, xs[0])
        total = squared_loss(y, targets[0])
        for x, target in zip(xs[1:], targets[1:]):
            h, y = model(h, x)
            total = total + squared_loss(y, target)
        return total

    value, grads = jax.value_and_grad(loss)(params)
    model = jax.lax.stop_gradient(eqx.combine(params, static))
    new_state, new_trace = state, trace
    for x in xs:
        new_state, new_trace, _ = rule.step(model, new_state, new_trace, x)
    return value, grads, new_state, new_trace


def _reference(rule, static, params, state, trace, xs, targets, k, optimizer=None):
    """Windows of `k` steps (the last one shorter) by `_reference_window`: `(loss, grads,
    state, trace)` summed over windows, or with `optimizer` the parameters after an update
    with each window's mean gradient."""
    total_loss, total = 0.0, jtu.tree_map(jnp.zeros_like, params)
    opt_state = None if optimizer is None else optimizer.init(params)
    for start in range(0, len(xs), k):
        window = slice(start, start + k)
        loss, grads, state, trace = _reference_window(
            rule, static, params, state, trace, xs[window], targets[window]
        )
        total_loss, total = total_loss + loss, jtu.tree_map(jnp.add, total, grads)
        if optimizer is not None:
            mean = jtu.tree_map(lambda g: g / len(xs[window]), grads)
            updates, opt_state = optimizer.update(mean, opt_state, params)
            params = optax.apply_updates(params, updates)
    if optimizer is not None:
        return params
    return total_loss, total, state, trace


LENGTH = 3


@pytest.fixture(scope="module")
def limits_problem():
    """A batch on the stacked network from random states, and its BPTT gradient."""
    rng = np.random.default_rng(0)
    model = _stack(jr.key(0))
    params, static, xs, targets = _problem(model, rng, LENGTH, (BATCH,))
    state = jtu.tree_map(
        lambda a: jnp.asarray(np.asarray(a) + 0.5 * rng.standard_normal((BATCH, *a.shape))),
        model.init_state(),
    )
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    bptt = eqtrace.bptt_gradient(forward, _batch_loss, params, state, xs, targets, reduction="sum")
    return model, params, static, state, xs, targets, bptt


@pytest.mark.parametrize(
    "case", [p for p in algorithm_cases() if LONG or p.values[0].name in TRACE_KINDS]
)
def test_window_of_one_is_the_rule_and_of_all_is_bptt(case, limits_problem):
    """On a vmapped batch through two recurrent layers: `k = 1` gives the stepped rule's loss,
    gradient, state and trace; `k = T` gives BPTT's gradient (every rule is exact at its first
    step from a zero trace), BPTT's final state and the rule's trace. One rule per kind of
    trace, and SnAp-1 (whose step reads its trace its own way), by default; every rule under
    `LONG`."""
    model, params, static, state, xs, targets, (bptt_loss, bptt, bptt_state) = limits_problem
    rule = case.algorithm
    try:
        _, trace = eqtrace.init_state_and_trace(model, rule, batch_size=BATCH)
    except ValueError as refusal:  # a rule made for other models (e.g. spiking layers only)
        pytest.skip(f"{case.name} refuses the model: {refusal}")
    step = jax.vmap(eqtrace.make_online_step(rule, static), in_axes=(None, 0, 0, 0))
    stepped = eqtrace.online_gradient(
        step, _batch_loss, params, state, trace, xs, targets, reduction="sum"
    )
    one = _windows(rule, static, params, state, trace, xs, targets, 1, batched=True)
    assert relative_error(one, stepped) <= 1e-12

    if not case.equals_rtrl_at_first_step:
        return
    loss, grads, final_state, final_trace = _windows(
        rule, static, params, state, trace, xs, targets, LENGTH, batched=True
    )
    assert relative_error(grads, bptt) <= 1e-9
    assert relative_error((loss, final_state), (bptt_loss, bptt_state)) <= 1e-12
    assert relative_error(final_trace, stepped[3]) <= 1e-10
    if not case.exact:  # the two limits differ: the window is not the rule in disguise
        assert relative_error(stepped[1], bptt) > 1e-3


@pytest.mark.parametrize("name", ["lif", "mingru", "lru"])
def test_drtrl_windows_are_bptt_on_elementwise_layers(name, getkey, rng):
    """D-RTRL's trace is exact on one element-wise-recurrent layer (LIF without recurrence,
    MinGRU, LRU with its read-out op), so every window is BPTT. Blocks of 3 over `T = 5` are a
    window of 3 and a window of 2, which starts from the trace the first one left."""
    model = make_cell(name, getkey())
    params, static, xs, targets = _problem(model, rng, 5)
    xs = 2 * xs  # LIF spikes
    state = random_state(rng, model)
    rule = eqtrace.DRTRL()
    _, grads, _, _ = _windows(
        rule, static, params, state, rule.init_trace(model, state), xs, targets, 3
    )
    _, bptt, _ = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(static), squared_loss, params, state, xs, targets, reduction="sum"
    )
    assert relative_error(grads, bptt) <= 1e-9


_LONG = os.environ.get("EQTRACE_HYPOTHESIS_PROFILE") == "long"


@settings(max_examples=100 if _LONG else 2, deadline=None, derandomize=not _LONG, database=None)
@given(
    length=st.integers(2, 5),
    k=st.integers(1, 5),
    case=st.sampled_from(ALGORITHMS),
    seed=st.integers(0, 2**16),
)
def test_windows_follow_their_definition(length, k, case, seed):
    """Any `(T, k)` and rule: loss, gradient, final state and trace equal the definition
    unrolled in Python; for an exact rule the gradient is BPTT's for every `k`."""
    rng = np.random.default_rng(seed)
    model = _stack(jr.key(seed))
    params, static, xs, targets = _problem(model, rng, length)
    state = random_state(rng, model)
    rule = case.algorithm
    try:
        trace = rule.init_trace(model, state, xs[0])
    except ValueError:
        return  # a rule made for other models
    windows = _windows(rule, static, params, state, trace, xs, targets, k)
    reference = _reference(rule, static, params, state, trace, xs, targets, k)
    assert relative_error(windows, reference) <= 1e-10
    if case.exact:
        _, bptt, _ = eqtrace.bptt_gradient(
            eqtrace.make_forward_step(static),
            squared_loss,
            params,
            state,
            xs,
            targets,
            reduction="sum",
        )
        assert relative_error(windows[1], bptt) <= 1e-9


def _gru_problem(getkey, rng, length, batch=()):
    model = nn.GRUCell(INPUT, 3, key=getkey())
    return model, *_problem(model, rng, length, batch)


def test_train_online_updates_once_per_window(getkey, rng):
    """`train_online(..., block_size=k)` updates after every window with its mean gradient, a
    last, shorter window taking the remainder."""
    model, params, static, xs, targets = _gru_problem(getkey, rng, 5)
    rule = eqtrace.PPProp(0.6)
    state = model.init_state()
    trace = rule.init_trace(model, state)
    sgd = optax.sgd(0.2)
    block = eqtrace.make_online_block(eqtrace.ExactWindows(rule), static)
    trained, *_ = eqtrace.train_online(
        block, squared_loss, sgd, params, sgd.init(params), state, trace, xs, targets, block_size=2
    )
    expected = _reference(rule, static, params, state, trace, xs, targets, 2, optimizer=sgd)
    assert relative_error(trained, expected) <= 1e-10
    assert relative_error(trained, params) > 1e-3  # it trained


def test_windows_batch_and_jit(getkey, rng):
    """A vmapped batch of windows equals a loop over its samples; a jitted window equals the
    same window without jit."""
    model, params, static, xs, targets = _gru_problem(getkey, rng, 3, (BATCH,))
    rule = eqtrace.PPProp(0.6)
    state, trace = eqtrace.init_state_and_trace(model, rule, batch_size=BATCH)
    state = state + normal(rng, state.shape, 0.5)
    batched = _windows(rule, static, params, state, trace, xs, targets, 2, batched=True)
    samples = [
        _windows(rule, static, params, state[b], trace_b, xs[:, b], targets[:, b], 2)
        for b, trace_b in enumerate(unstack_tree(trace))
    ]
    mean = jtu.tree_map(lambda *a: sum(a) / BATCH, *[s[:2] for s in samples])
    stacked = jtu.tree_map(lambda *a: jnp.stack(a), *[s[2:] for s in samples])
    assert relative_error(batched, (*mean, *stacked)) <= 1e-10

    block = eqtrace.make_online_block(eqtrace.ExactWindows(rule), static)

    def window_loss(params, state, trace):
        _, _, ys = block(params, state, trace, xs[:2, 0])
        return squared_loss(ys, targets[:2, 0])

    args = (params, state[0], unstack_tree(trace)[0])
    jitted = jax.jit(jax.value_and_grad(window_loss))(*args)
    eager = jax.value_and_grad(window_loss)(*args)  # op by op
    assert relative_error(jitted, eager) <= 1e-10


def unstack_tree(tree):
    """The samples of a batched pytree (leading axis)."""
    return [jtu.tree_map(lambda a: a[b], tree) for b in range(BATCH)]


def test_windows_refuse_what_is_not_a_rule():
    # Under this suite's type-checking hook the annotation answers first, naming `rule`;
    # without it, ExactWindows' own check (test_errors.py).
    with pytest.raises(TypeError, match="rule"):
        eqtrace.ExactWindows(eqtrace.DRTRL)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="already `ExactWindows"):
        eqtrace.ExactWindows(eqtrace.ExactWindows(eqtrace.DRTRL()))
