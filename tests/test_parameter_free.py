"""The built-in cells without parameters, `eqtrace.nn.DelayLine` and
`eqtrace.nn.LegendreMemory`: what they hold (by hand, and against the continuous system they
discretise), and the rules keeping D-RTRL exact on one before an element-wise-recurrent layer
(in steps, in blocks, in exact windows). The general case (user cells without parameters
anywhere in random networks) is in `test_generated.py`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.integrate
from jax.sharding import Mesh, PartitionSpec as P
from numpy.polynomial import legendre

import eqtrace
from eqtrace import nn
from helpers import online_and_bptt, pairs, random_sequence, random_state, tree_allclose


def test_window_by_hand():
    delay = nn.DelayLine(2, 3)
    state = delay.init_state()
    assert state.shape == (3, 2)
    for t in range(4):
        state, y = delay(state, jnp.array([t, 10.0 + t]))
    # The last three inputs, oldest first, flattened.
    np.testing.assert_array_equal(y, [1.0, 11.0, 2.0, 12.0, 3.0, 13.0])
    assert eqtrace.nn.DelayLine(1, 2, dtype=jnp.float32).init_state().dtype == jnp.float32


#: Each front-end reads 2 features and outputs 6.
FRONT_ENDS = {
    "delay": lambda: nn.DelayLine(2, 3),
    "legendre": lambda: nn.LegendreMemory(2, 3, 5.0),
}


@pytest.fixture(params=sorted(FRONT_ENDS))
def front_end(request):
    return FRONT_ENDS[request.param]()


def _delayed_mingru(front_end):
    k1, k2 = jr.split(jr.key(0))
    return nn.Sequential([front_end, nn.MinGRUCell(6, 4, key=k1), eqx.nn.Linear(4, 2, key=k2)])


@pytest.mark.parametrize(
    "algorithm, front",
    pairs([eqtrace.RTRL(), eqtrace.DRTRL(), eqtrace.SnAp1(), eqtrace.EProp()], sorted(FRONT_ENDS)),
)
def test_exact_rules_stay_exact_behind_a_front_end(rng, algorithm, front):
    """A cell without parameters has nothing to learn: D-RTRL (and SnAp-1, e-prop) on one
    element-wise layer behind it is BPTT, from a random state; the front-end keeps no trace."""
    model = _delayed_mingru(FRONT_ENDS[front]())
    xs, targets = random_sequence(rng, model, 6, 2)
    state = random_state(rng, model)
    online, bptt = online_and_bptt(algorithm, model, xs, targets, state=state)
    assert tree_allclose(online, bptt, rtol=1e-9, atol=1e-12)
    if algorithm.per_layer:
        assert algorithm.init_trace(model, state, xs[0])[0] is None


def test_blocks_equal_steps_with_a_front_end(rng, front_end):
    """In blocks, the front-end is scanned without a trace: the same state and gradient."""
    model = nn.Sequential(
        [
            eqx.nn.Linear(2, 2, key=jr.key(1)),  # parameters before the front-end
            front_end,
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
    stepped = eqtrace.online_gradient(
        step, loss_fn, params, state, trace, xs, targets, reduction="sum"
    )
    blocked = eqtrace.online_gradient(
        block, loss_fn, params, state, trace, xs, targets, block_size=3, reduction="sum"
    )
    assert tree_allclose(stepped, blocked, rtol=1e-10, atol=1e-12)
    report = eqtrace.check(model, algorithm)
    name = type(front_end).__name__
    assert report.ok and f"{name} has no parameters: no trace" in str(report)


@pytest.mark.parametrize("size", [0, -2, True])
def test_bad_sizes(size):
    with pytest.raises(ValueError, match="DelayLine: `length` must be a positive int"):
        nn.DelayLine(1, size)


def test_exact_windows_differentiate_a_front_end_through_its_state(rng, front_end):
    """Within an exact window the front-end is differentiated through its state too, so the
    layer with parameters before it gets its delayed credit: one window of the whole sequence
    is BPTT."""
    model = nn.Sequential(
        [
            eqx.nn.Linear(2, 2, key=jr.key(1)),
            front_end,
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
        block, loss_fn, params, state, trace, xs, targets, block_size=5, reduction="sum"
    )
    _, bptt, _ = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(static), loss_fn, params, state, xs, targets, reduction="sum"
    )
    assert tree_allclose(windowed, bptt, rtol=1e-9, atol=1e-12)


def test_model_parallel_shardings_skip_a_front_end(front_end):
    """`make_shardings` passes a front-end's output shape on to the next cell and gives the
    front-end no trace layout."""
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("batch", "model"))
    model = _delayed_mingru(front_end)
    shardings = eqtrace.make_shardings(model, eqtrace.DRTRL(), mesh, model_axis="model")
    assert shardings.trace[0] is None
    assert shardings.params.layers[1].input_op.weight.spec == P("model", None)
    assert shardings.trace[1].ops[0].weight.spec == P("batch", "model", None, None)


def test_legendre_memory_recalls_the_window():
    """`x_{t−k} ≈ Σ_i P̃_i((k + ½)/θ) m_{t,i}` for a smooth input, at every lag of the window,
    for each feature separately; and nothing is remembered of a constant input but the
    constant (P̃_0 carries it, the other coefficients decay to zero)."""
    order, window = 12, 20.0
    memory = nn.LegendreMemory(2, order, window)

    def signal(t):
        return np.stack([np.sin(2 * np.pi * t / 37), np.cos(2 * np.pi * t / 23)], axis=-1)

    times = np.arange(120)
    _, states = jax.lax.scan(
        lambda m, x: (memory(m, x)[0],) * 2, memory.init_state(), jnp.asarray(signal(times))
    )
    for lag in range(int(window)):
        basis = legendre.legvander(np.array([2 * (lag + 0.5) / window - 1]), order - 1)[0]
        recalled = np.einsum("i,tif->tf", basis, np.asarray(states))
        error = np.abs(recalled[60:] - signal(times[60:] - lag)).max()
        assert error < 0.02, (lag, error)

    constant = jnp.full((200, 2), 3.0)
    _, states = jax.lax.scan(lambda m, x: (memory(m, x)[0],) * 2, memory.init_state(), constant)
    np.testing.assert_allclose(states[-1], np.eye(order, 1) * np.array([[3.0, 3.0]]), atol=1e-8)


def test_legendre_memory_discretises_the_continuous_system():
    """One step of the memory is the delay system `θ ṁ = A m + B u` integrated over a unit
    of time with the input held (to the integrator's tolerance)."""
    order, window = 5, 7.0
    i, j = np.meshgrid(np.arange(order), np.arange(order), indexing="ij")
    a = (2 * i + 1) * np.where(i < j, -1.0, (-1.0) ** (i - j + 1)) / window
    b = (2 * np.arange(order) + 1) * (-1.0) ** np.arange(order) / window
    rng = np.random.default_rng(0)
    m0, u = rng.normal(size=order), rng.normal()
    solution = scipy.integrate.solve_ivp(
        lambda _, m: a @ m + b * u, (0.0, 1.0), m0, rtol=1e-12, atol=1e-12
    )
    memory = nn.LegendreMemory(1, order, window)
    m1, y = memory(jnp.asarray(m0)[:, None], jnp.asarray([u]))
    np.testing.assert_allclose(m1[:, 0], solution.y[:, -1], rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(y, m1[:, 0])
    assert nn.LegendreMemory(1, 2, 3, dtype=jnp.float32).init_state().dtype == jnp.float32


@pytest.mark.parametrize("window", [0, -1.0, True])
def test_legendre_memory_bad_window(window):
    with pytest.raises(ValueError, match="LegendreMemory: `window` must be a positive number"):
        nn.LegendreMemory(1, 4, window)
