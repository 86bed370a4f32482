"""Random feedback (`eqtrace.nn.RandomFeedback`): the plain read-out when `B = W`, a two-step
case by hand, `B` never a parameter, and its errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import eqtrace
from eqtrace import nn
from helpers import relative_error, squared_loss


def _unwrap(grads):
    """A gradient of a model with a feedback read-out, as one of the plain model."""
    return jax.tree_util.tree_map(
        lambda node: node.op if isinstance(node, nn.RandomFeedback) else node,
        grads,
        is_leaf=lambda node: isinstance(node, nn.RandomFeedback),
    )


def _gradient(algorithm, model, xs, targets):
    """The summed online gradient, or BPTT's without an algorithm."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = model.init_state()
    if algorithm is None:
        forward = eqtrace.make_forward_step(static)
        return eqtrace.bptt_gradient(
            forward, squared_loss, params, state, xs, targets, reduction="sum"
        )[1]
    trace = algorithm.init_trace(model, state)
    step = eqtrace.make_online_step(algorithm, static)
    return eqtrace.online_gradient(
        step, squared_loss, params, state, trace, xs, targets, reduction="sum"
    )[1]


def test_symmetric_feedback_is_the_plain_readout(getkey, rng):
    xs = jnp.asarray(2 * rng.standard_normal((5, 3)))
    targets = jnp.asarray(rng.standard_normal((5, 2)))
    lif = nn.LIF(3, 4, recurrent=True, key=getkey())
    # Inside a leaky read-out, online (e-prop, whose learning signal it gives).
    readout = nn.LeakyReadout(4, 2, tau=4.0, key=getkey())
    symmetric = nn.RandomFeedback(readout.input_op, readout.input_op.weight)
    plain = nn.Sequential([lif, readout])
    wrapped = nn.Sequential([lif, eqx.tree_at(lambda r: r.input_op, readout, symmetric)])
    a = _gradient(eqtrace.EProp(), plain, xs, targets)
    b = _gradient(eqtrace.EProp(), wrapped, xs, targets)
    assert relative_error(_unwrap(b), a) <= 1e-12
    # As a stateless read-out (of `eqx.nn.Linear`), BPTT.
    linear = eqx.nn.Linear(4, 2, key=getkey())
    plain = nn.Sequential([lif, linear])
    wrapped = nn.Sequential([lif, nn.RandomFeedback(linear, linear.weight)])
    a = _gradient(None, plain, xs, targets)
    b = _gradient(None, wrapped, xs, targets)
    assert relative_error(_unwrap(b), a) <= 1e-12


def test_two_steps_by_hand(getkey):
    # h_t = κ h_{t−1} + (1 − κ)(U x_t + a) (a leaky linear layer), y_t = W h_t + c with feedback B,
    # L = Σ_t Σ y_t. Then ∂L/∂W = Σ_t 1 h_tᵀ (exact), and the credit to h_s is
    # Σ_{t≥s} κ^{t−s} Bᵀ 1, so ∂L/∂U = Σ_s (1 − κ) (Σ_{t≥s} κ^{t−s}) Bᵀ 1 x_sᵀ.
    layer = nn.LeakyReadout(3, 2, tau=2.0, key=getkey())
    linear = nn.Linear(2, 1, key=getkey())
    feedback = np.array([[0.7, -1.3]])
    model = nn.Sequential([layer, nn.RandomFeedback(linear, feedback)])
    xs = jnp.array([[1.0, -2.0, 0.5], [0.3, 0.4, -1.0]])
    kappa, u, a = layer.decay, np.asarray(layer.input_op.weight), layer.input_op.bias
    h1 = (1 - kappa) * (u @ xs[0] + a)
    h2 = kappa * h1 + (1 - kappa) * (u @ xs[1] + a)
    signal = feedback.T @ np.ones(1)
    grad_u = (1 - kappa) * ((1 + kappa) * np.outer(signal, xs[0]) + np.outer(signal, xs[1]))
    grad_w = (h1 + h2)[None]

    def loss(y, target):
        del target
        return jnp.sum(y)

    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = model.init_state()
    forward = eqtrace.make_forward_step(static)
    bptt = eqtrace.bptt_gradient(
        forward, loss, params, state, xs, jnp.zeros((2, 1)), reduction="sum"
    )[1]
    assert np.allclose(bptt.layers[0].input_op.weight, grad_u, rtol=1e-12)
    assert np.allclose(bptt.layers[1].op.weight, grad_w, rtol=1e-12)
    # Online, the leaky layer's trace holds the sum over s; at each step the learning signal
    # is Bᵀ 1, so D-RTRL (exact for this layer) gives the same.
    algorithm = eqtrace.DRTRL()
    trace = algorithm.init_trace(model, state)
    step = eqtrace.make_online_step(algorithm, static)
    online = eqtrace.online_gradient(
        step, loss, params, state, trace, xs, jnp.zeros((2, 1)), reduction="sum"
    )[1]
    assert np.allclose(online.layers[0].input_op.weight, grad_u, rtol=1e-12)
    assert np.allclose(online.layers[1].op.weight, grad_w, rtol=1e-12)


def test_feedback_is_not_a_parameter(getkey):
    linear = nn.Linear(4, 2, key=getkey())
    wrapped = nn.RandomFeedback(linear, key=getkey())
    params, _ = eqx.partition(wrapped, eqx.is_inexact_array)
    assert len(jax.tree_util.tree_leaves(params)) == 2  # W and b only
    limit = 1 / np.sqrt(4)
    assert wrapped.matrix.shape == (2, 4) and float(jnp.max(jnp.abs(wrapped.matrix))) <= limit
    assert wrapped.matrix.dtype == linear.weight.dtype
    # An optimiser step leaves it as it was.
    optimiser = optax.adamw(0.1, weight_decay=0.5)
    grads = jax.grad(lambda p: jnp.sum(p(jnp.ones(4))))(params)
    updates, _ = optimiser.update(grads, optimiser.init(params), params)
    updated = eqx.apply_updates(wrapped, updates)
    assert np.array_equal(updated.matrix, wrapped.matrix)
    assert not np.array_equal(updated.op.weight, wrapped.op.weight)
    # A random B changes the credit below, not the read-out's own gradient.
    x = jnp.ones(4)
    grad_x = jax.grad(lambda x: jnp.sum(wrapped(x)))(x)
    assert np.allclose(grad_x, wrapped.matrix.T @ jnp.ones(2))
    assert np.allclose(
        jax.grad(lambda p: jnp.sum(p(x)))(linear).weight,
        jax.grad(lambda p: jnp.sum(p(x)))(params).op.weight,
    )


def test_feedback_errors(getkey):
    linear = nn.Linear(4, 2, key=getkey())
    with pytest.raises(ValueError, match=r"weight shape .* = \(2, 4\), but received \(4, 2\)"):
        nn.RandomFeedback(linear, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="exactly one of `feedback`"):
        nn.RandomFeedback(linear)
    with pytest.raises(ValueError, match="exactly one of `feedback`"):
        nn.RandomFeedback(linear, jnp.zeros((2, 4)), key=jr.key(0))
    with pytest.raises(TypeError):  # Named by the annotation check, or by eqtrace without one.
        nn.RandomFeedback(eqx.nn.Conv1d(1, 1, 1, key=getkey()), key=getkey())
