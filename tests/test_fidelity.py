"""The fidelity monitor of `train_online`: exact rules read cosine 1 and ratio 1; an inexact
rule reads what `compare_gradients` gives for the same gradients computed by hand; training is
the same, bit for bit, with the monitor on or off; every registered rule runs under it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import eqtrace
from eqtrace import nn
from helpers import LONG, mse, relative_error
from registry import ALGORITHMS, TRACE_KINDS


LENGTH, BATCH, INPUT, HIDDEN, OUTPUT = 12, 3, 3, 4, 2


def _model():
    return nn.Sequential(
        [nn.GRUCell(INPUT, HIDDEN, key=jr.key(0)), eqx.nn.Linear(HIDDEN, OUTPUT, key=jr.key(1))]
    )


def _data(length=LENGTH, batch=(BATCH,)):
    xs = jr.normal(jr.key(2), (length, *batch, INPUT))
    targets = jr.normal(jr.key(3), (length, *batch, OUTPUT))
    return xs, targets


def _steps(rule, static, batched=True):
    step = eqtrace.make_online_step(rule, static)
    block = eqtrace.make_online_block(rule, static)
    if not batched:
        return step, block
    return (
        jax.vmap(step, in_axes=(None, 0, 0, 0)),
        jax.vmap(block, in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1)),
    )


def _train(rule, monitor, optimizer=None, *, block_size=None, length=LENGTH, **options):
    model = _model()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = optax.sgd(0.0) if optimizer is None else optimizer
    step, block = _steps(rule, static)
    state, trace = eqtrace.init_state_and_trace(model, rule, batch_size=BATCH)
    xs, targets = _data(length)
    return eqtrace.train_online(
        step if block_size is None else block,
        mse,
        optimizer,
        params,
        optimizer.init(params),
        state,
        trace,
        xs,
        targets,
        block_size=block_size,
        monitor=monitor,
        **options,
    )


def _assert_matches(fidelity, i, estimate, reference):
    """The `i`-th measured update of `fidelity` is `compare_gradients(estimate, reference)`."""
    expected = eqtrace.compare_gradients(estimate, reference)
    measured = fidelity.comparison(i)
    np.testing.assert_allclose(measured.overall_cosine, expected.overall_cosine, rtol=1e-9)
    np.testing.assert_allclose(measured.overall_norm_ratio, expected.overall_norm_ratio, rtol=1e-9)
    for got, want in zip(jax.tree.leaves(measured.cosine), jax.tree.leaves(expected.cosine)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


# (Windows of exact RTRL without blocks: in `test_every_rule_runs_under_the_monitor`.)
@pytest.mark.parametrize("reference, block_size", [("window", 5), ("rtrl", 5)])
def test_an_exact_rule_reads_one(reference, block_size):
    window = 2 if reference == "window" else None
    monitor = eqtrace.FidelityMonitor(every=2, samples=2, reference=reference, window=window)
    *_, fidelity = _train(eqtrace.RTRL(), monitor, optax.adam(1e-2), block_size=block_size)
    updates = LENGTH if block_size is None else 3
    assert fidelity.update.tolist() == monitor.measured(updates) and len(fidelity.update) >= 1
    np.testing.assert_allclose(fidelity.overall_cosine, 1.0, atol=1e-12)
    np.testing.assert_allclose(fidelity.overall_norm_ratio, 1.0, rtol=1e-9)
    for leaf in jax.tree.leaves(fidelity.cosine):
        np.testing.assert_allclose(leaf, 1.0, atol=1e-9)


@eqx.filter_jit
def _states(params, static, xs):
    """The state of the batch before each step of `xs`, with parameters held fixed."""
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))

    def body(state, x):
        return forward(params, state, x)[0], state

    state = eqtrace.init_state_and_trace(eqx.combine(params, static), eqtrace.RTRL(), BATCH)[0]
    return jax.lax.scan(body, state, xs)[1]


def _by_hand(rule, xs, targets, start, length, samples, **options):
    """The rule's online gradient and BPTT's over `length` steps from `start`, on the first
    `samples` samples, with parameters held fixed: the online one from a fresh trace at the
    window's first state (with `start=0`, the stream's start)."""
    model = _model()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    step, _ = _steps(rule, static)
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    state = jax.tree.map(lambda a: a[start, :samples], _states(params, static, xs))
    trace = eqtrace.init_state_and_trace(model, rule, batch_size=samples)[1]
    xs, targets = xs[start : start + length, :samples], targets[start : start + length, :samples]
    _, online, _, _ = eqtrace.online_gradient(
        step, mse, params, state, trace, xs, targets, reduction="sum", **options
    )
    _, bptt, _ = eqtrace.bptt_gradient(
        forward, mse, params, state, xs, targets, reduction="sum", **options
    )
    return online, bptt


def test_window_of_an_inexact_rule_is_compare_gradients_by_hand():
    """D-RTRL on a GRU with recurrent weights, with step weights: at each measured update the
    monitor reads `compare_gradients` of the rule's online gradient (from a fresh trace) and
    BPTT's over the window, computed by hand."""
    weights = jnp.linspace(0.5, 1.5, LENGTH)
    monitor = eqtrace.FidelityMonitor(every=4, samples=2, window=3)
    *_, fidelity = _train(eqtrace.DRTRL(), monitor, step_weights=weights)
    assert fidelity.update.tolist() == [3, 7, 11]
    assert fidelity.reference == "window" and fidelity.window == 3 and fidelity.samples == 2
    xs, targets = _data()
    for i, u in enumerate(fidelity.update.tolist()):
        start = u - 2
        online, bptt = _by_hand(
            eqtrace.DRTRL(), xs, targets, start, 3, 2, step_weights=weights[start : u + 1]
        )
        _assert_matches(fidelity, i, online, bptt)
    assert np.all(np.asarray(fidelity.overall_cosine) < 1 - 1e-6)
    lines = str(fidelity).splitlines()
    assert lines[0] == "eqtrace fidelity (BPTT over windows of 3 updates, 2 samples):"
    assert len(lines) == 2 + 3 and lines[2].split()[:2] == ["3", "3"]
    assert "eqtrace.compare_gradients" in str(fidelity.comparison(1))


def test_window_in_blocks_takes_the_blocks_mean_and_the_remainder():
    """Blocks of 2 over 11 steps (the last block has 1): each update's loss is its block's
    mean, as training takes it."""
    monitor = eqtrace.FidelityMonitor(every=2, samples=2, window=2)
    *_, fidelity = _train(eqtrace.DRTRL(), monitor, block_size=2, length=11)
    assert fidelity.update.tolist() == [1, 3, 5]
    assert fidelity.step.tolist() == [3, 7, 10]
    xs, targets = _data(11)
    for i, (start, length) in enumerate([(0, 4), (4, 4), (8, 3)]):
        weights = jnp.asarray([0.5, 0.5, 0.5, 0.5][: length - 1] + [1.0 if length == 3 else 0.5])
        online, bptt = _by_hand(
            eqtrace.DRTRL(), xs, targets, start, length, 2, step_weights=weights
        )
        _assert_matches(fidelity, i, online, bptt)


def test_rtrl_reference_is_bptt_through_the_stream_by_hand():
    """With fixed parameters, RTRL alongside is BPTT from the stream's start: the monitor
    reads `compare_gradients` of D-RTRL's gradient of the measured step (with its carried
    trace) and BPTT's of the same step's loss."""
    monitor = eqtrace.FidelityMonitor(every=5, samples=2, reference="rtrl")
    *_, fidelity = _train(eqtrace.DRTRL(), monitor)
    assert fidelity.update.tolist() == [4, 9] and fidelity.window == 1
    xs, targets = _data()
    for i, u in enumerate(fidelity.update.tolist()):
        # The whole stream, with the loss on step `u` alone: one program for every `u`.
        onehot = jnp.arange(LENGTH) == u
        online, bptt = _by_hand(eqtrace.DRTRL(), xs, targets, 0, LENGTH, 2, step_weights=onehot)
        _assert_matches(fidelity, i, online, bptt)
    assert np.all(np.asarray(fidelity.overall_cosine) < 1 - 1e-6)


@pytest.mark.parametrize("reference, block_size", [("window", None), ("rtrl", 3)])
def test_training_is_unchanged(reference, block_size):
    monitor = eqtrace.FidelityMonitor(every=3, reference=reference)
    off = _train(eqtrace.DRTRL(), None, optax.adam(1e-2), block_size=block_size)
    on = _train(eqtrace.DRTRL(), monitor, optax.adam(1e-2), block_size=block_size)
    assert len(off) == 5 and len(on) == 6
    # Nothing the monitor computes feeds back into training. The two programs are compiled
    # separately, and XLA may order their arithmetic differently (it does for blocks under this
    # suite's compile-fast flags, tests/conftest.py), so equal up to float64 round-off; a
    # monitor that fed back would move the parameters by far more.
    for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(on[:5])):
        assert relative_error(np.asarray(b), np.asarray(a)) <= 1e-13
    # The default sub-batch: at most 4 samples, here the whole batch of 3.
    assert on[5].samples == BATCH


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, id=case.name) for case in ALGORITHMS if LONG or case.name in TRACE_KINDS]
    + ["windows"],
)
def test_every_rule_runs_under_the_monitor(case):
    """Every kind of trace (every registered rule under `LONG`) and exact windows of D-RTRL,
    in blocks where the rule takes them, with sequence targets and step weights: one finite
    reading per measured update."""
    if case == "windows":
        rule, block_size = eqtrace.ExactWindows(eqtrace.DRTRL()), 2
    else:
        rule = case.make(strict=False) if case.needs_structure else case.algorithm
        block_size = 2 if case.supports_blocks and case.name != "rtrl" else None
    model = _model()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    step, block = _steps(rule, static)
    state, trace = eqtrace.init_state_and_trace(model, rule, batch_size=BATCH)
    xs, _ = _data(6)
    optimizer = optax.sgd(0.1)
    *_, fidelity = eqtrace.train_online(
        step if block_size is None else block,
        mse,
        optimizer,
        params,
        optimizer.init(params),
        state,
        trace,
        xs,
        jnp.ones((BATCH, OUTPUT)),
        block_size=block_size,
        step_weights=jnp.arange(6) >= 2,
        sequence_targets=True,
        monitor=eqtrace.FidelityMonitor(every=1, samples=2, window=2),
    )
    updates = 6 if block_size is None else 3
    assert fidelity.update.tolist() == list(range(1, updates))
    assert np.all(np.isfinite(np.asarray(fidelity.overall_cosine)))
    assert np.all(np.asarray(fidelity.overall_cosine) > 0)
    if case != "windows" and case.exact:
        np.testing.assert_allclose(fidelity.overall_cosine, 1.0, atol=1e-9)


def test_one_sequence_without_a_batch_axis():
    model = _model()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    step, _ = _steps(eqtrace.RTRL(), static, batched=False)
    state, trace = eqtrace.init_state_and_trace(model, eqtrace.RTRL())
    xs, targets = _data(6, batch=())
    optimizer = optax.sgd(0.1)
    *_, fidelity = eqtrace.train_online(
        step,
        mse,
        optimizer,
        params,
        optimizer.init(params),
        state,
        trace,
        xs,
        targets,
        monitor=eqtrace.FidelityMonitor(every=3, window=3),
    )
    assert fidelity.update.tolist() == [2, 5] and fidelity.samples == 1
    np.testing.assert_allclose(fidelity.overall_cosine, 1.0, atol=1e-12)


def test_schedule():
    assert eqtrace.FidelityMonitor(every=3, window=5).measured(12) == [5, 8, 11]
    assert eqtrace.FidelityMonitor(every=4, reference="rtrl").measured(9) == [3, 7]
    # No full window in the stream: no entry, and a table that says so.
    *_, none = _train(eqtrace.DRTRL(), eqtrace.FidelityMonitor(every=20, samples=1))
    assert none.update.shape == (0,) and none.overall_cosine.shape == (0,)
    assert "no update measured" in str(none)
