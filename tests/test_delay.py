"""`eqtrace.nn.DelayLine`, a cell without parameters: its window by hand, and the rules keeping
D-RTRL exact on a delay line before an element-wise-recurrent layer (in steps and in blocks).
The general case (delay lines anywhere in random networks) is in `test_generated.py`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import eqtrace
from eqtrace import nn
from helpers import online_and_bptt, random_sequence, random_state, tree_allclose


def test_window_by_hand():
    delay = nn.DelayLine(2, 3)
    state = delay.init_state()
    assert state.shape == (3, 2)
    for t in range(4):
        state, y = delay(state, jnp.array([t, 10.0 + t]))
    # The last three inputs, oldest first, flattened.
    np.testing.assert_array_equal(y, [1.0, 11.0, 2.0, 12.0, 3.0, 13.0])
    assert eqtrace.nn.DelayLine(1, 2, dtype=jnp.float32).init_state().dtype == jnp.float32


def _delayed_mingru():
    k1, k2 = jr.split(jr.key(0))
    return nn.Sequential(
        [nn.DelayLine(2, 3), nn.MinGRUCell(6, 4, key=k1), eqx.nn.Linear(4, 2, key=k2)]
    )


@pytest.mark.parametrize(
    "algorithm", [eqtrace.RTRL(), eqtrace.DRTRL(), eqtrace.SnAp1(), eqtrace.EProp()]
)
def test_exact_rules_stay_exact_behind_a_delay_line(rng, algorithm):
    """A delay line has nothing to learn: D-RTRL (and SnAp-1, e-prop) on one element-wise
    layer behind it is BPTT, from a random state; the delay line keeps no trace."""
    model = _delayed_mingru()
    xs, targets = random_sequence(rng, model, 6, 2)
    state = random_state(rng, model)
    online, bptt = online_and_bptt(algorithm, model, xs, targets, state=state)
    assert tree_allclose(online, bptt, rtol=1e-9, atol=1e-12)
    if algorithm.per_layer:
        assert algorithm.init_trace(model, state, xs[0])[0] is None


def test_blocks_equal_steps_with_a_delay_line(rng):
    """In blocks, the delay line is scanned without a trace: the same state and gradient."""
    model = nn.Sequential(
        [
            eqx.nn.Linear(2, 2, key=jr.key(1)),  # parameters before the delay line
            nn.DelayLine(2, 3),
            nn.GRUCell(6, 3, key=jr.key(2)),
        ]
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    xs, targets = random_sequence(rng, model, 6, 2)
    state = random_state(rng, model)
    algorithm = eqtrace.DRTRL()
    trace = algorithm.init_trace(model, state, xs[0])

    def loss_fn(y, target):
        return jnp.sum((y - target) ** 2)

    step = eqtrace.make_online_step(algorithm, static)
    block = eqtrace.make_online_block(algorithm, static)
    stepped = eqtrace.online_gradient(step, loss_fn, params, state, trace, xs, targets)
    blocked = eqtrace.online_gradient(
        block, loss_fn, params, state, trace, xs, targets, block_size=3
    )
    assert tree_allclose(stepped, blocked, rtol=1e-10, atol=1e-12)
    report = eqtrace.check(model, algorithm)
    assert report.ok and "DelayLine has no parameters: no trace" in str(report)


@pytest.mark.parametrize("size", [0, -2, True])
def test_bad_sizes(size):
    with pytest.raises(ValueError, match="DelayLine: `length` must be a positive int"):
        nn.DelayLine(1, size)


def test_exact_windows_differentiate_a_delay_line_through_its_state(rng):
    """Within an exact window the delay line is differentiated through its state too, so the
    layer with parameters before it gets its delayed credit: one window of the whole sequence
    is BPTT."""
    model = nn.Sequential(
        [
            eqx.nn.Linear(2, 2, key=jr.key(1)),
            nn.DelayLine(2, 3),
            nn.GRUCell(6, 3, key=jr.key(2)),
        ]
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    xs, targets = random_sequence(rng, model, 5, 2)
    state = random_state(rng, model)
    algorithm = eqtrace.ExactWindows(eqtrace.DRTRL())

    def loss_fn(y, target):
        return jnp.sum((y - target) ** 2)

    block = eqtrace.make_online_block(algorithm, static)
    trace = algorithm.init_trace(model, state, xs[0])
    _, windowed, _, _ = eqtrace.online_gradient(
        block, loss_fn, params, state, trace, xs, targets, block_size=5
    )
    _, bptt, _ = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(static), loss_fn, params, state, xs, targets
    )
    assert tree_allclose(windowed, bptt, rtol=1e-9, atol=1e-12)


def test_model_parallel_shardings_skip_a_delay_line():
    """`make_shardings` passes a delay line's output shape on to the next cell and gives the
    delay line no trace layout."""
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("batch", "model"))
    shardings = eqtrace.make_shardings(_delayed_mingru(), eqtrace.DRTRL(), mesh, model_axis="model")
    assert shardings.trace[0] is None
    assert shardings.params.layers[1].input_op.weight.spec == P("model", None)
    assert shardings.trace[1].ops[0].weight.spec == P("batch", "model", None, None)
