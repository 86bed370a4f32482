from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np

import eqtrace
from eqtrace import nn


def tree_allclose(x: Any, y: Any, *, rtol: float = 1e-9, atol: float = 0.0) -> bool:
    """Whether two pytrees have the same structure and all leaves are close."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    # NumPy rather than jax.numpy: eager JAX ops compile once per shape, which adds up.
    return all(
        a.shape == b.shape and bool(np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol))
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    )


def relative_error(x: Any, y: Any) -> float:
    """Largest leaf-wise `max|x - y| / max|y|` (zero leaves of `y` compare absolutely)."""
    errors = [
        float(np.max(np.abs(np.asarray(a) - b)) / np.maximum(np.max(np.abs(b)), 1e-300))
        if b.size
        else 0.0
        for a, b in ((a, np.asarray(b)) for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y)))
    ]
    return max(errors)


def squared_loss(y, target):
    return jnp.sum((y - target) ** 2)


def random_sequence(key, model, length: int, input_size: int, output_shape: tuple[int, ...]):
    xkey, tkey = jr.split(key)
    xs = jr.normal(xkey, (length, input_size))
    targets = jr.normal(tkey, (length, *output_shape))
    return xs, targets


def online_and_bptt(algorithm, model, xs, targets, loss_fn=squared_loss, state=None):
    """Summed per-step online gradients (through the trace path) and the BPTT gradient."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    if state is None:
        state = model.init_state()
    trace = algorithm.init_trace(model, state, xs[0])
    online_step = eqtrace.make_online_step(algorithm, static)
    _, online, _, _ = eqtrace.online_gradient(
        online_step, loss_fn, params, state, trace, xs, targets
    )
    _, bptt, _ = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(static), loss_fn, params, state, xs, targets
    )
    return online, bptt


def output_shape(model, x) -> tuple[int, ...]:
    state = model.init_state()
    _, y = jax.eval_shape(model, state, x)
    return y.shape


class LeakyTanh(eqtrace.AbstractCell):
    """`h' = α ⊙ h + tanh(W x + b)`: element-wise recurrence, learnable per-neuron decay."""

    op: eqx.nn.Linear
    decay: jax.Array

    def __init__(self, input_size, hidden_size, *, key):
        self.op = eqx.nn.Linear(input_size, hidden_size, key=key)
        self.decay = jnp.linspace(0.3, 0.9, hidden_size)

    def init_state(self):
        return jnp.zeros(self.decay.shape)

    def __call__(self, state, x):
        h = self.decay * state + jnp.tanh(self.op(x))
        return h, h


class LeakyCurrent(eqtrace.AbstractCell):
    """Two state leaves per neuron (current and potential): a 2×2 block per neuron, plus a
    shared scalar gain."""

    op: nn.Linear
    log_tau: jax.Array
    gain: jax.Array

    def __init__(self, input_size, hidden_size, *, key):
        self.op = nn.Linear(input_size, hidden_size, key=key)
        self.log_tau = jnp.log(jnp.linspace(2.0, 5.0, hidden_size))
        self.gain = jnp.array(0.7)

    def init_state(self):
        return jnp.zeros(self.log_tau.shape), jnp.zeros(self.log_tau.shape)

    def __call__(self, state, x):
        current, potential = state
        current = 0.8 * current + self.op(x)
        decay = jnp.exp(-1 / jnp.exp(self.log_tau))
        potential = decay * potential + (1 - decay) * jnp.tanh(self.gain * current + potential)
        return (current, potential), potential

    def output(self, state):
        return state[1]


def every_cell():
    """Every built-in cell, sized input 3 → 4 neurons, with inputs strong enough to spike."""
    return {
        "rnn": lambda k: nn.RNNCell(3, 4, key=k),
        "gru": lambda k: nn.GRUCell(3, 4, key=k),
        "lstm": lambda k: nn.LSTMCell(3, 4, key=k),
        "mingru": lambda k: nn.MinGRUCell(3, 4, key=k),
        "lru": lambda k: nn.LRUCell(3, 4, key=k),
        "lif": lambda k: nn.LIF(3, 4, key=k, recurrent=True, synapse=True, learn_tau=True),
        "lif-zero": lambda k: nn.LIF(3, 4, key=k, reset="zero", tau_mem=5.0),
        "alif": lambda k: nn.ALIF(3, 4, key=k, recurrent=True, learn_tau=True, learn_beta=True),
        "readout": lambda k: nn.LeakyReadout(3, 4, key=k),
    }


class TokenCell(eqtrace.AbstractCell):
    """An embedding and a masked recurrent op: `h' = leak ⊙ h + tanh(E[token] + W_mask h)`."""

    embed: eqx.nn.Embedding
    recurrent: nn.Linear
    leak: float = eqx.field(static=True)

    def __init__(self, *, leak: float = 0.0, key):
        k1, k2 = jr.split(key)
        self.embed = eqx.nn.Embedding(5, 4, key=k1)
        mask = jnp.array(np.random.default_rng(0).random((4, 4)) < 0.5)
        self.recurrent = nn.Linear(4, 4, mask=mask, key=k2)
        self.leak = leak

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, state, token):
        h = self.leak * state + jnp.tanh(self.embed(token) + self.recurrent(state))
        return h, h
