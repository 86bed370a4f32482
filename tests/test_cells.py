import functools
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
from helpers import online_and_bptt, relative_error
from registry import BUILTIN_CELLS, SPIKING, algorithms, make_cell


INPUT, HIDDEN, LENGTH = 3, 4, 8


# The cell that follows each cell in the two-layer network (a read-out follows spikes).
# One configuration per cell class is enough here (each costs a compilation).
SECOND = {
    "rnn": "rnn",
    "gru": "gru",
    "lstm": "lstm",
    "mingru": "mingru",
    "lru-wide-output": "lru-wide-output",
    "lif-recurrent-synapse": "lif-zero-triangle",
    "alif-learn": "alif",
    "leaky-readout": "lif",  # a leaky read-out after spiking neurons
}


def _make(name, key, dtype=jnp.float64, input_size=INPUT):
    return make_cell(name, key, input_size, HIDDEN, dtype)


def _output_size(cell) -> int:
    return getattr(cell, "output_size", cell.hidden_size)


def _inputs(key, length=LENGTH, dtype=jnp.float64):
    # Large enough that spiking cells fire.
    return 2.0 * jr.normal(key, (length, INPUT), dtype)


def _run(model, xs):
    def body(state, x):
        state, y = model(state, x)
        return state, (state, y)

    return jax.lax.scan(body, model.init_state(), xs)[1]


def _leaves(tree):
    return jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", BUILTIN_CELLS)
def test_shapes_and_dtypes(name, dtype, getkey):
    cell = _make(name, getkey(), dtype)
    assert all(leaf.dtype == dtype for leaf in _leaves(cell))
    state = cell.init_state()
    for leaf in jtu.tree_leaves(state):
        # One sample, no batch axis; every leaf one value per neuron.
        assert leaf.shape == (cell.hidden_size,) and leaf.dtype == dtype
        assert jnp.all(leaf == 0)
    x = jr.normal(getkey(), (INPUT,), dtype)
    new_state, y = eqx.filter_jit(cell)(state, x)  # one compilation beats many eager dispatches
    assert jtu.tree_structure(new_state) == jtu.tree_structure(state)
    for old, new in zip(jtu.tree_leaves(state), jtu.tree_leaves(new_state)):
        assert new.shape == old.shape and new.dtype == dtype
    assert y.shape == (_output_size(cell),) and y.dtype == dtype
    # The output is a function of the new state alone.
    assert jnp.array_equal(cell.output(new_state), y)


@pytest.mark.parametrize("name", BUILTIN_CELLS)
def test_vmap_and_jit(name, getkey):
    cell = _make(name, getkey())
    batch = 3
    state = cell.init_state()
    states = jtu.tree_map(lambda leaf: jr.normal(getkey(), (batch, *leaf.shape)), state)
    xs = _inputs(getkey(), length=batch)
    batched_state, batched_y = jax.vmap(cell)(states, xs)
    for b in range(batch):
        state_b = jtu.tree_map(lambda a: a[b], states)
        new_state, y = cell(state_b, xs[b])
        assert jnp.allclose(batched_y[b], y, rtol=1e-12, atol=1e-14)
        for leaf, expected in zip(jtu.tree_leaves(batched_state), jtu.tree_leaves(new_state)):
            assert jnp.allclose(leaf[b], expected, rtol=1e-12, atol=1e-14)
        jit_state, jit_y = eqx.filter_jit(cell)(state_b, xs[b])
        assert jnp.allclose(jit_y, y, rtol=1e-12, atol=1e-14)
        for leaf, expected in zip(jtu.tree_leaves(jit_state), jtu.tree_leaves(new_state)):
            assert jnp.allclose(leaf, expected, rtol=1e-12, atol=1e-14)


EXACT = algorithms(exact=True)


@functools.cache
def _online_and_bptt(name: str, algorithm):
    keys = jr.split(jr.key(7), 3)
    cell = _make(name, keys[0])
    xs = _inputs(keys[1])
    targets = jr.normal(keys[2], (LENGTH, _output_size(cell)))
    online, bptt = online_and_bptt(algorithm, cell, xs, targets)
    return cell, xs, online, bptt


@pytest.mark.parametrize("algorithm", EXACT)
@pytest.mark.parametrize("name", BUILTIN_CELLS)
def test_exact_rule_equals_bptt(name, algorithm):
    cell, xs, online, bptt = _online_and_bptt(name, algorithm)
    if name in SPIKING:
        _, spikes = _run(cell, xs)
        assert 0 < jnp.sum(spikes) < spikes.size  # the test exercises the spiking regime
    assert jtu.tree_structure(online) == jtu.tree_structure(bptt)
    assert relative_error(online, bptt) <= 1e-9


@pytest.mark.parametrize("algorithm", EXACT)
@pytest.mark.parametrize("name", BUILTIN_CELLS)
def test_every_parameter_gets_a_gradient(name, algorithm):
    cell, _, online, _ = _online_and_bptt(name, algorithm)
    names = [
        jtu.keystr(path)
        for path, _ in jtu.tree_leaves_with_path(eqx.filter(cell, eqx.is_inexact_array))
    ]
    leaves = _leaves(online)
    assert len(leaves) == len(names)
    for path, leaf in zip(names, leaves):
        assert jnp.any(leaf != 0), f"{name}: parameter {path} gets a zero online gradient"


@pytest.mark.parametrize("algorithm", EXACT)
@pytest.mark.parametrize("name", SECOND)
def test_exact_rule_equals_bptt_two_layers(name, algorithm, getkey):
    first = _make(name, getkey())
    second = _make(SECOND[name], getkey(), input_size=_output_size(first))
    readout = eqx.nn.Linear(_output_size(second), 2, dtype=jnp.float64, key=getkey())
    model = nn.Sequential([first, second, readout])
    xs = _inputs(getkey())
    targets = jr.normal(getkey(), (LENGTH, 2))
    if name in SPIKING:
        (first_states, _, _), _ = _run(model, xs)
        spikes = jax.vmap(first.output)(first_states)
        assert 0 < jnp.sum(spikes) < spikes.size
    online, bptt = online_and_bptt(algorithm, model, xs, targets)
    assert relative_error(online, bptt) <= 1e-9
    # The first layer's parameters get credit through the second layer.
    assert all(jnp.any(leaf != 0) for leaf in _leaves(online.layers[0]))


# Reference dynamics.


def test_lstm_one_step(getkey):
    cell = nn.LSTMCell(INPUT, HIDDEN, key=getkey())
    h, c = jr.normal(getkey(), (2, HIDDEN))
    x = jr.normal(getkey(), (INPUT,))
    w_x, b, w_h = cell.input_op.weight, cell.input_op.bias, cell.recurrent_op.weight
    assert b is not None and jnp.array_equal(b, jnp.repeat(jnp.array([0.0, 1, 0, 0]), HIDDEN))
    sig = lambda u: 1 / (1 + np.exp(-u))  # noqa: E731
    gates = []
    for k in range(4):
        rows = slice(k * HIDDEN, (k + 1) * HIDDEN)
        gates.append(np.asarray(w_x[rows] @ x + b[rows] + w_h[rows] @ h))
    i, f, g, o = sig(gates[0]), sig(gates[1]), np.tanh(gates[2]), sig(gates[3])
    c_new = f * np.asarray(c) + i * g
    h_new = o * np.tanh(c_new)
    (h_out, c_out), y = cell((h, c), x)
    np.testing.assert_allclose(c_out, c_new, rtol=1e-12)
    np.testing.assert_allclose(h_out, h_new, rtol=1e-12)
    assert jnp.array_equal(y, h_out)


def test_gru_one_step(getkey):
    cell = nn.GRUCell(INPUT, HIDDEN, key=getkey())
    h = np.asarray(jr.normal(getkey(), (HIDDEN,)))
    x = np.asarray(jr.normal(getkey(), (INPUT,)))
    w_x, b_x = np.asarray(cell.input_op.weight), np.asarray(cell.input_op.bias)
    w_h, b_h = np.asarray(cell.recurrent_op.weight), np.asarray(cell.recurrent_op.bias)
    sig = lambda u: 1 / (1 + np.exp(-u))  # noqa: E731
    part = [slice(k * HIDDEN, (k + 1) * HIDDEN) for k in range(3)]
    r = sig(w_x[part[0]] @ x + b_x[part[0]] + w_h[part[0]] @ h + b_h[part[0]])
    z = sig(w_x[part[1]] @ x + b_x[part[1]] + w_h[part[1]] @ h + b_h[part[1]])
    n = np.tanh(w_x[part[2]] @ x + b_x[part[2]] + r * (w_h[part[2]] @ h + b_h[part[2]]))
    h_new, y = cell(jnp.asarray(h), jnp.asarray(x))
    np.testing.assert_allclose(h_new, (1 - z) * n + z * h, rtol=1e-12)
    assert jnp.array_equal(y, h_new)


def test_mingru_one_step(getkey):
    cell = nn.MinGRUCell(INPUT, HIDDEN, key=getkey())
    h = np.asarray(jr.normal(getkey(), (HIDDEN,)))
    x = np.asarray(jr.normal(getkey(), (INPUT,)))
    u = np.asarray(cell.input_op.weight) @ x + np.asarray(cell.input_op.bias)
    z = 1 / (1 + np.exp(-u[:HIDDEN]))
    h_new, _ = cell(jnp.asarray(h), jnp.asarray(x))
    np.testing.assert_allclose(h_new, (1 - z) * h + z * u[HIDDEN:], rtol=1e-12)


def test_lru_eigenvalues_and_one_step(getkey):
    r_min, r_max, max_phase = 0.5, 0.8, 1.0
    cell = nn.LRUCell(INPUT, 16, r_min=r_min, r_max=r_max, max_phase=max_phase, key=getkey())
    lam = np.exp(-np.exp(cell.nu_log) + 1j * np.exp(cell.theta_log))
    assert np.all(np.abs(lam) < 1)
    assert np.all((r_min <= np.abs(lam)) & (np.abs(lam) <= r_max))
    assert np.all((np.angle(lam) >= 0) & (np.angle(lam) <= max_phase))
    np.testing.assert_allclose(np.exp(cell.gamma_log), np.sqrt(1 - np.abs(lam) ** 2), rtol=1e-12)
    lam_re, lam_im = cell.eigenvalues()
    np.testing.assert_allclose(lam_re + 1j * lam_im, lam, rtol=1e-12)
    # One step against complex arithmetic.
    h_re, h_im = jr.normal(getkey(), (2, 16))
    x = jr.normal(getkey(), (INPUT,))
    b = np.asarray(cell.input_op_re.weight) + 1j * np.asarray(cell.input_op_im.weight)
    c = np.asarray(cell.output_op_re.weight) + 1j * np.asarray(cell.output_op_im.weight)
    h = np.asarray(h_re) + 1j * np.asarray(h_im)
    h_new = lam * h + np.exp(cell.gamma_log) * (b @ np.asarray(x))
    (re, im), y = cell((h_re, h_im), x)
    np.testing.assert_allclose(re + 1j * im, h_new, rtol=1e-12)
    np.testing.assert_allclose(y, (c @ h_new).real, rtol=1e-12)
    # The default ring is stable too.
    default = nn.LRUCell(INPUT, 16, key=getkey())
    assert jnp.all(jnp.exp(-jnp.exp(default.nu_log)) < 1)
    with pytest.raises(ValueError, match="r_max"):
        nn.LRUCell(INPUT, 4, r_max=1.0, key=getkey())


@pytest.mark.parametrize("synapse", [False, True])
@pytest.mark.parametrize("learn_tau", [False, True])
def test_lif_decay_without_input(synapse, learn_tau, getkey):
    tau_mem, tau_syn, dt = 10.0, 4.0, 0.5
    cell = nn.LIF(
        INPUT,
        HIDDEN,
        recurrent=True,
        synapse=synapse,
        learn_tau=learn_tau,
        tau_mem=tau_mem,
        tau_syn=tau_syn,
        dt=dt,
        key=getkey(),
    )
    v = jnp.linspace(-0.5, 0.9, HIDDEN)  # below threshold: no spike, no reset
    i = jnp.linspace(0.0, 0.01, HIDDEN)
    state = (v, i) if synapse else (v,)
    x = jnp.zeros(INPUT)
    alpha, alpha_syn = math.exp(-dt / tau_mem), math.exp(-dt / tau_syn)
    for _ in range(3):
        new_state, s = cell(state, x)
        assert jnp.all(s == 0)
        if synapse:
            np.testing.assert_allclose(new_state[1], alpha_syn * state[1], rtol=1e-12)
            np.testing.assert_allclose(new_state[0], alpha * state[0] + new_state[1], rtol=1e-12)
        else:
            np.testing.assert_allclose(new_state[0], alpha * state[0], rtol=1e-12)
        state = new_state


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("kind", ["lif", "alif"])
def test_reset(reset, kind, getkey):
    threshold, tau = 0.8, 20.0
    cls = nn.LIF if kind == "lif" else nn.ALIF
    cell = cls(INPUT, HIDDEN, reset=reset, threshold=threshold, tau_mem=tau, key=getkey())
    alpha = math.exp(-1 / tau)
    v0 = jnp.array([1.5, 0.5, -0.3, 0.79])  # only neuron 0 crosses the threshold
    x = jnp.zeros(INPUT)
    if kind == "lif":
        # The LIF's spikes are a function of v: (v0,) has spiked; the next step resets it.
        s0 = cell.output((v0,))
        assert jnp.array_equal(s0, (v0 > threshold).astype(v0.dtype))
        state, s1 = cell((v0,), x)
        v1 = alpha * v0 - threshold * s0 if reset == "subtract" else alpha * (1 - s0) * v0
        np.testing.assert_allclose(state[0], v1, rtol=1e-12)
        assert state[0][0] == pytest.approx(alpha * 1.5 - threshold if reset == "subtract" else 0)
        assert jnp.all(s1 == 0)
        return
    zeros = jnp.zeros(HIDDEN)
    state, s1 = cell((v0, zeros, zeros), x)
    v1 = alpha * v0
    np.testing.assert_allclose(state[0], v1, rtol=1e-12)
    # Spikes are exactly [v > threshold].
    assert jnp.array_equal(s1, (v1 > threshold).astype(v1.dtype))
    assert jnp.array_equal(s1, jnp.array([1.0, 0.0, 0.0, 0.0]))
    # The spike resets the membrane at the next step.
    state, s2 = cell(state, x)
    if reset == "subtract":
        v2 = alpha * v1 - threshold * s1
    else:
        v2 = alpha * (1 - s1) * v1
    np.testing.assert_allclose(state[0], v2, rtol=1e-12)
    assert state[0][0] == pytest.approx(
        alpha * alpha * 1.5 - threshold if reset == "subtract" else 0
    )
    assert jnp.all(s2 == 0)


def test_alif_threshold_rises_after_a_spike(getkey):
    beta, tau_adapt, threshold = 0.5, 50.0, 1.0
    cell = nn.ALIF(INPUT, HIDDEN, beta=beta, tau_adapt=tau_adapt, threshold=threshold, key=getkey())
    rho = math.exp(-1 / tau_adapt)
    zeros = jnp.zeros(HIDDEN)
    state = (jnp.array([2.0, 0.0, 0.0, 0.0]), zeros, zeros)
    x = jnp.zeros(INPUT)
    state, s1 = cell(state, x)
    assert jnp.array_equal(s1, jnp.array([1.0, 0.0, 0.0, 0.0]))
    np.testing.assert_allclose(cell.adaptive_threshold(state), threshold)
    state, _ = cell(state, x)
    np.testing.assert_allclose(state[1], s1)  # a_t = ρ a_{t-1} + s_{t-1}
    np.testing.assert_allclose(cell.adaptive_threshold(state), threshold + beta * s1)
    state, _ = cell(state, x)
    np.testing.assert_allclose(state[1], rho * s1)  # then it relaxes
    # Under the same constant drive, adaptation lowers the firing rate.
    weight = jnp.full((HIDDEN, INPUT), 0.1)
    lif = eqx.tree_at(lambda c: c.input_op.weight, nn.LIF(INPUT, HIDDEN, key=getkey()), weight)
    alif = eqx.tree_at(lambda c: c.input_op.weight, cell, weight)
    xs = jnp.ones((40, INPUT))
    lif_spikes = _run(lif, xs)[1].sum()
    alif_spikes = _run(alif, xs)[1].sum()
    assert 0 < alif_spikes < lif_spikes


def test_leaky_readout_filters(getkey):
    tau, dt = 5.0, 1.0
    cell = nn.LeakyReadout(INPUT, 2, tau=tau, dt=dt, key=getkey())
    kappa = math.exp(-dt / tau)
    y = jr.normal(getkey(), (2,))
    x = jr.normal(getkey(), (INPUT,))
    new_y, out = cell(y, x)
    assert cell.input_op.bias is not None
    expected = kappa * y + (1 - kappa) * (cell.input_op.weight @ x + cell.input_op.bias)
    np.testing.assert_allclose(new_y, expected, rtol=1e-12)
    assert jnp.array_equal(out, new_y)
    assert cell.hidden_size == 2


def test_masked_weights_stay_zero_and_get_no_gradient():
    cell, _, online, _ = _online_and_bptt("lif-masked", eqtrace.RTRL())
    for op, grad in ((cell.input_op, online.input_op), (cell.recurrent_op, online.recurrent_op)):
        assert not jnp.all(op.mask)
        assert jnp.all(jnp.where(op.mask, 0, op.weight) == 0)
        assert jnp.all(jnp.where(op.mask, 0, grad.weight) == 0)


def test_learnable_time_constants_are_per_neuron(getkey):
    cell = nn.ALIF(INPUT, HIDDEN, synapse=True, learn_tau=True, learn_beta=True, key=getkey())
    for leaf in (cell.log_tau_mem, cell.log_tau_syn, cell.log_tau_adapt, cell.beta_per_neuron):
        assert leaf is not None and leaf.shape == (HIDDEN,)
    static = nn.ALIF(INPUT, HIDDEN, key=getkey())
    assert static.log_tau_mem is None and static.beta_per_neuron is None
    assert isinstance(static.tau_mem, float) and isinstance(static.beta, float)


def test_invalid_arguments(getkey):
    with pytest.raises((ValueError, TypeError), match="reset"):  # TypeError under beartype
        nn.LIF(INPUT, HIDDEN, reset="none", key=getkey())  # pyright: ignore
    with pytest.raises(ValueError, match="tau_mem"):
        nn.LIF(INPUT, HIDDEN, tau_mem=0.0, key=getkey())
    with pytest.raises(ValueError, match="recurrent_mask"):
        nn.ALIF(INPUT, HIDDEN, recurrent_mask=jnp.ones((HIDDEN, HIDDEN), bool), key=getkey())
    with pytest.raises(ValueError, match="beta"):
        nn.ALIF(INPUT, HIDDEN, beta=-1.0, key=getkey())
    for alpha in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"RNNCell: `alpha` must lie in \(0, 1\]"):
            nn.RNNCell(INPUT, HIDDEN, alpha=alpha, key=getkey())
