"""Three-factor learning (`eqtrace.modulated_loss`): a learning signal the caller supplies in
place of the loss's cotangent, through every rule's online step.

Oracles: with the modulator set to the true learning signal `∂L_t/∂y_t`, the modulated
gradient equals the rule's online gradient of `L` (every rule, float64, through the drivers'
`lax.scan` on a `jax.vmap`ped step, stepped and in blocks); a two-step case computed by hand
from D-RTRL's eligibility traces; the modulator is never differentiated.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import eqtrace
from helpers import LONG, pairs
from registry import TRACE_KINDS, algorithm_cases, make_cell


LENGTH, BATCH, INPUT, HIDDEN = 4, 2, 3, 3


def _loss(y, target):
    return jnp.mean((y - target) ** 2)


def _setup(algorithm, model, block=False):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x = jnp.zeros(INPUT)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=BATCH, x=x)
    if block:
        step = jax.vmap(
            eqtrace.make_online_block(algorithm, static),
            in_axes=(None, 0, 0, 1),
            out_axes=(0, 0, 1),
        )
    else:
        step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    return params, step, state, trace


def _true_learning_signals(step, params, state, trace, xs, targets, block_size=None):
    """`∂L_t/∂y_t` at every step: the cotangent the loss sends into the step's output."""
    ys, _, _ = eqtrace.run_online(step, params, state, trace, xs, block_size=block_size)
    return jax.vmap(jax.grad(_loss))(ys, targets)


def _assert_trees_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def _sequence(key, outputs=HIDDEN):
    kx, kt = jr.split(key)
    return jr.normal(kx, (LENGTH, BATCH, INPUT)), jr.normal(kt, (LENGTH, BATCH, outputs))


_CELLS = ["gru", "lif-recurrent-synapse-learn-tau", "alif-recurrent-learn-tau-beta", "lstm"]


# One rule per kind of trace by default, every rule under `LONG`.
@pytest.mark.parametrize(
    "case, cell",
    pairs([p for p in algorithm_cases() if LONG or p.values[0].name in TRACE_KINDS], _CELLS),
)
def test_true_learning_signal_gives_the_rules_online_gradient(case, cell, getkey):
    model = make_cell(cell, getkey(), INPUT, HIDDEN)
    params, step, state, trace = _setup(case.algorithm, model)
    xs, targets = _sequence(getkey())
    signals = _true_learning_signals(step, params, state, trace, xs, targets)
    expected = eqtrace.online_gradient(
        step, _loss, params, state, trace, xs, targets, reduction="sum"
    )[1]
    modulated = eqtrace.online_gradient(
        step, eqtrace.modulated_loss, params, state, trace, xs, signals, reduction="sum"
    )[1]
    _assert_trees_close(modulated, expected)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(modulated))


def test_true_learning_signal_under_eprop_blocks(getkey):
    """e-prop (the filtered traces under a leaky read-out), in blocks:
    the read-out's within-step credit carries the modulator down to the cell, as it carries
    the loss's cotangent."""
    model = eqtrace.nn.Sequential(
        [
            eqtrace.nn.LIF(INPUT, 5, key=getkey()),
            eqtrace.nn.LeakyReadout(5, 2, key=getkey()),
        ]
    )
    algorithm = eqtrace.EProp()
    params, block, state, trace = _setup(algorithm, model, block=True)
    xs, targets = _sequence(getkey(), outputs=2)
    signals = _true_learning_signals(block, params, state, trace, xs, targets, block_size=3)
    args = (params, state, trace, xs)
    expected = eqtrace.online_gradient(block, _loss, *args, targets, block_size=3)[1]
    modulated = eqtrace.online_gradient(
        block, eqtrace.modulated_loss, *args, signals, block_size=3
    )[1]
    _assert_trees_close(modulated, expected)


def test_true_learning_signal_under_train_online(getkey):
    """An SGD update after every step: the modulator computed from each step's output as the
    loss's cotangent trains exactly as the loss does."""
    model = make_cell("mingru", getkey(), INPUT, HIDDEN)
    params, step, state, trace = _setup(eqtrace.DRTRL(), model)
    xs, targets = _sequence(getkey())

    def signalled(y, target):
        return eqtrace.modulated_loss(y, jax.grad(_loss)(y, target))

    optimizer = optax.sgd(0.5)
    opt_state = optimizer.init(params)
    args = (optimizer, params, opt_state, state, trace, xs, targets)
    run = eqtrace.train_online(step, _loss, *args)
    run_m = eqtrace.train_online(step, signalled, *args)
    _assert_trees_close(run_m[:4], run[:4])
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), run[0], params)
    assert all(d > 1e-3 for d in jax.tree.leaves(moved))


class _TwoLeaky(eqtrace.AbstractCell):
    """`h_t = α ⊙ h_{t-1} + W x_t + U h_{t-1}`, `y_t = tanh(h_t)`: two neurons, one input."""

    input_op: eqx.nn.Linear
    recurrent_op: eqx.nn.Linear
    decay: tuple[float, float] = eqx.field(static=True)

    def __init__(self, w, u, decay):
        self.input_op = eqx.nn.Linear(1, 2, use_bias=False, key=jr.key(0))
        self.recurrent_op = eqx.nn.Linear(2, 2, use_bias=False, key=jr.key(0))
        self.input_op = eqx.tree_at(lambda op: op.weight, self.input_op, jnp.asarray(w))
        self.recurrent_op = eqx.tree_at(lambda op: op.weight, self.recurrent_op, jnp.asarray(u))
        self.decay = decay

    def init_state(self):
        return jnp.zeros(2)

    def __call__(self, state, x):
        h = jnp.asarray(self.decay) * state + self.input_op(x) + self.recurrent_op(state)
        return h, self.output(h)

    def output(self, state):
        return jnp.tanh(state)


def test_two_steps_by_hand():
    """D-RTRL's eligibility traces of a two-neuron leaky cell, written out for two steps:
    `ε^W_{ij,t} = α_i ε^W_{ij,t-1} + x_{j,t}`, `ε^U_{ij,t} = α_i ε^U_{ij,t-1} + h_{j,t-1}` (the
    paths through the other neuron dropped), `e_t = tanh'(h_t) ε_t`; the three-factor update
    is `Σ_t m_{t,i} e_{ij,t}`."""
    alpha = np.array([0.5, 0.8])
    w = np.array([[1.0], [-2.0]])
    u = np.array([[0.1, 0.3], [-0.2, 0.4]])
    xs = np.array([[1.0], [0.5]])
    ms = np.array([[2.0, -1.0], [0.5, 3.0]])  # a per-neuron modulator at each step

    h0 = np.zeros(2)
    h1 = alpha * h0 + w @ xs[0] + u @ h0  # [1, -2]
    h2 = alpha * h1 + w @ xs[1] + u @ h1  # [0.5 + 0.5 - 0.5, -1.6 - 1 - 1.0]
    eps_w1 = np.zeros((2, 1)) * alpha[:, None] + xs[0][None, :]
    eps_w2 = alpha[:, None] * eps_w1 + xs[1][None, :]
    eps_u1 = alpha[:, None] * np.zeros((2, 2)) + h0[None, :]
    eps_u2 = alpha[:, None] * eps_u1 + h1[None, :]
    post1, post2 = 1 - np.tanh(h1) ** 2, 1 - np.tanh(h2) ** 2
    expected_w = (ms[0] * post1)[:, None] * eps_w1 + (ms[1] * post2)[:, None] * eps_w2
    expected_u = (ms[0] * post1)[:, None] * eps_u1 + (ms[1] * post2)[:, None] * eps_u2
    np.testing.assert_allclose(h2, [0.5, -3.6])  # the arithmetic of the comments

    model = _TwoLeaky(w, u, (0.5, 0.8))
    algorithm = eqtrace.DRTRL()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, x=jnp.zeros(1))
    step = eqtrace.make_online_step(algorithm, static)
    _, grads, _, _ = eqtrace.online_gradient(
        step, eqtrace.modulated_loss, params, state, trace, jnp.asarray(xs), ms, reduction="sum"
    )
    np.testing.assert_allclose(grads.input_op.weight, expected_w, rtol=1e-12)
    np.testing.assert_allclose(grads.recurrent_op.weight, expected_u, rtol=1e-12)
    # Not the exact gradient: D-RTRL drops the path of `W` through `U h_1` (RTRL keeps it).
    rtrl = eqtrace.RTRL()
    state, trace = eqtrace.init_state_and_trace(model, rtrl, x=jnp.zeros(1))
    exact = eqtrace.online_gradient(
        eqtrace.make_online_step(rtrl, static),
        eqtrace.modulated_loss,
        params,
        state,
        trace,
        jnp.asarray(xs),
        ms,
        reduction="sum",
    )[1]
    assert not np.allclose(exact.input_op.weight, expected_w)


def test_modulator_is_held_constant_and_broadcast(getkey):
    """A modulator computed from the outputs (a TD error from the critic) is a signal, not
    part of the loss; one per sample is broadcast over the neurons."""
    model = make_cell("mingru", getkey(), INPUT, HIDDEN)
    params, step, state, trace = _setup(eqtrace.DRTRL(), model)
    x = jr.normal(getkey(), (BATCH, INPUT))

    def gradient(loss_of_y):
        def loss(params):
            return loss_of_y(step(params, state, trace, x)[2])

        return jax.jit(jax.grad(loss))(params)

    def from_outputs(y):  # one modulator per sample, computed from the outputs themselves
        return eqtrace.modulated_loss(y, jnp.sum(y**2, axis=1))

    y = step(params, state, trace, x)[2]
    delta = jnp.sum(y**2, axis=1)
    constant = gradient(lambda y: eqtrace.modulated_loss(y, delta))
    _assert_trees_close(gradient(from_outputs), constant)
    spread = gradient(
        lambda y: eqtrace.modulated_loss(y, jnp.broadcast_to(delta[:, None], y.shape))
    )
    _assert_trees_close(spread, constant)
    # Reward-based: a per-sample reward-prediction error times a per-sample log-probability.
    actions = jnp.array([0, 2])

    def log_prob(y):
        return jnp.take_along_axis(jax.nn.log_softmax(y), actions[:, None], axis=1)[:, 0]

    reinforce = gradient(lambda y: eqtrace.modulated_loss(-log_prob(y), delta))
    by_hand = gradient(lambda y: -jnp.sum(delta * log_prob(y)))
    _assert_trees_close(reinforce, by_hand)
    # A pytree of outputs with one modulator per leaf, or one for all.
    pair = gradient(lambda y: eqtrace.modulated_loss((y, y), (delta, 2.0 * delta)))
    _assert_trees_close(pair, jax.tree.map(lambda g: 3.0 * g, constant))


def test_modulator_on_a_hidden_layers_state(getkey):
    """A modulator on the hidden layer's returned state, in place of `∂L/∂h_t` (braintrace's
    `ThreeFactor`): with `m_t = W_outᵀ ∂L_t/∂y_t`, the true learning signal of the layer under
    a linear read-out, the layer's parameters get the rule's online gradient of `L`."""
    model = eqtrace.nn.Sequential(
        [make_cell("mingru", getkey(), INPUT, HIDDEN), eqx.nn.Linear(HIDDEN, 2, key=getkey())]
    )
    algorithm = eqtrace.DRTRL()
    params, step, state, trace = _setup(algorithm, model)
    xs, targets = _sequence(getkey(), outputs=2)
    signals = _true_learning_signals(step, params, state, trace, xs, targets)
    hidden_signals = signals @ model.layers[1].weight  # W_outᵀ g, per sample and step

    def body(carry, inputs):
        state, trace, grads = carry
        x, m = inputs

        def loss(params):
            new_state, new_trace, _ = step(params, state, trace, x)
            return eqtrace.modulated_loss(new_state[0], m), (new_state, new_trace)

        g, (state, trace) = jax.grad(loss, has_aux=True)(params)
        return (state, trace, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (_, _, grads), _ = jax.lax.scan(body, (state, trace, zeros), (xs, hidden_signals))
    expected = eqtrace.online_gradient(
        step, _loss, params, state, trace, xs, targets, reduction="sum"
    )[1]
    _assert_trees_close(grads.layers[0], expected.layers[0])
    assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(grads.layers[1]))
