"""RFLO (Murray 2019) is a configuration, not a rule: `eqtrace.DRTRL()` on a leaky RNN whose
read-out op is wrapped in `eqtrace.nn.RandomFeedback`. The oracle is the paper's equations
written naively (a loop over time with its eligibility traces and feedback matrix)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

import eqtrace
from eqtrace import nn
from helpers import online_only, relative_error, squared_loss


INPUT, HIDDEN, OUTPUT, LENGTH = 3, 5, 2, 7


class LeakyRNN(eqtrace.AbstractCell):
    """Murray's network: `h_t = (1 − α) h_{t-1} + α tanh(W h_{t-1} + W_in x_t + b)`."""

    input_op: nn.Linear
    recurrent_op: nn.Linear
    alpha: float = eqx.field(static=True)

    def __init__(self, alpha, *, key):
        ki, kr = jr.split(key)
        self.input_op = nn.Linear(INPUT, HIDDEN, key=ki)
        self.recurrent_op = nn.Linear(HIDDEN, HIDDEN, use_bias=False, key=kr)
        self.alpha = alpha

    def init_state(self):
        return jnp.zeros(HIDDEN)

    def __call__(self, state, x):
        u = self.input_op(x) + self.recurrent_op(state)
        h = (1 - self.alpha) * state + self.alpha * jnp.tanh(u)
        return h, h


def _naive_rflo(cell, readout, feedback, xs, targets):
    """Murray's RFLO: `P_ij ← (1 − α) P_ij + α φ'(u_i) r_j` for every input `r` of a weight
    (the previous state, the input, the constant 1 of the bias), and
    `ΔW_ij = Σ_t [B e_t]_i P_ij(t)` with `e_t = ∂L_t/∂y_t` and `B` the fixed random feedback
    (`N × N_out`); the read-out's own gradient is exact."""
    alpha = cell.alpha
    w_in, b = cell.input_op.weight, cell.input_op.bias
    w_rec = cell.recurrent_op.weight

    def step(carry, inputs):
        h, p_rec, p_in, p_b, grads = carry
        x, target = inputs
        u = w_in @ x + b + w_rec @ h
        gain = alpha * (1 - jnp.tanh(u) ** 2)  # α φ'(u)
        p_rec = (1 - alpha) * p_rec + jnp.outer(gain, h)
        p_in = (1 - alpha) * p_in + jnp.outer(gain, x)
        p_b = (1 - alpha) * p_b + gain
        h = (1 - alpha) * h + alpha * jnp.tanh(u)
        y = readout.weight @ h + readout.bias
        error = jax.grad(squared_loss)(y, target)
        signal = feedback @ error  # B e_t
        updates = {
            "w_rec": signal[:, None] * p_rec,
            "w_in": signal[:, None] * p_in,
            "b": signal * p_b,
            "w_out": jnp.outer(error, h),
            "b_out": error,
        }
        return (h, p_rec, p_in, p_b, jtu.tree_map(jnp.add, grads, updates)), None

    zeros = {
        "w_rec": jnp.zeros_like(w_rec),
        "w_in": jnp.zeros_like(w_in),
        "b": jnp.zeros_like(b),
        "w_out": jnp.zeros_like(readout.weight),
        "b_out": jnp.zeros_like(readout.bias),
    }
    init = (
        jnp.zeros(HIDDEN),
        jnp.zeros_like(w_rec),
        jnp.zeros_like(w_in),
        jnp.zeros(HIDDEN),
        zeros,
    )
    (*_, grads), _ = jax.lax.scan(step, init, (xs, targets))
    return grads


@pytest.mark.parametrize("builtin", [True, False], ids=["nn.RNNCell", "user-cell"])
def test_drtrl_with_random_feedback_is_rflo(builtin, getkey):
    if builtin:
        cell = nn.RNNCell(INPUT, HIDDEN, alpha=0.2, key=getkey())
    else:
        cell = LeakyRNN(0.2, key=getkey())
    linear = eqx.nn.Linear(HIDDEN, OUTPUT, key=getkey())
    readout = nn.RandomFeedback(linear, key=getkey())
    model = nn.Sequential([cell, readout])
    xs, targets = jr.normal(getkey(), (LENGTH, INPUT)), jr.normal(getkey(), (LENGTH, OUTPUT))
    online = online_only(eqtrace.DRTRL(), model, xs, targets)
    # `RandomFeedback` holds `B` in the read-out weight's shape; Murray's is its transpose.
    naive = _naive_rflo(cell, linear, readout.matrix.T, xs, targets)
    got = {
        "w_rec": online.layers[0].recurrent_op.weight,
        "w_in": online.layers[0].input_op.weight,
        "b": online.layers[0].input_op.bias,
        "w_out": online.layers[1].op.weight,
        "b_out": online.layers[1].op.bias,
    }
    assert relative_error(got, naive) <= 1e-12
    # Not vacuous: with the read-out's own weights as feedback, the update is another one.
    symmetric = online_only(eqtrace.DRTRL(), nn.Sequential([cell, linear]), xs, targets)
    assert relative_error(symmetric.layers[0], online.layers[0]) > 1e-2
