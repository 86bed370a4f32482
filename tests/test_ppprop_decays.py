"""pp-prop with separate input and output decays against its oracles: the two-decay update
written naively (a loop in plain JAX with its equations); today's single-decay `PPProp`
when the decays are equal; D-RTRL (and so RTRL) at the first step from any state; blocks =
steps, a vmapped batch = the sum over samples, jit = no jit."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import eqtrace
from eqtrace import nn
from helpers import online_and_bptt, online_in_blocks, random_state, relative_error, squared_loss


INPUT, HIDDEN, LENGTH = 3, 4, 7
CASES = [(0.3, 0.8, True), (0.3, 0.8, False), (0.6, 0.0, True), (0.5, 0.5, True)]


class LeakyTanh(eqtrace.AbstractCell):
    """`h_t = λ ⊙ h_{t-1} + tanh(W x_t + U h_{t-1} + b)`: D-RTRL's cut Jacobian is `λ`, the
    sensitivity of `h` to the summed op outputs `1 − tanh²(u)`, so the traces are written
    out by hand below."""

    input_op: nn.Linear
    recurrent_op: nn.Linear
    decay: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, *, key):
        k1, k2 = jr.split(key)
        self.input_op = nn.Linear(INPUT, HIDDEN, key=k1)
        self.recurrent_op = nn.Linear(HIDDEN, HIDDEN, use_bias=False, key=k2)
        self.decay = tuple(float(d) for d in np.linspace(0.2, 0.9, HIDDEN))

    def init_state(self):
        return jnp.zeros(HIDDEN)

    def __call__(self, state, x):
        h = jnp.asarray(self.decay) * state + jnp.tanh(self.input_op(x) + self.recurrent_op(state))
        return h, h

    def output(self, state):
        return state


def _naive(cell, xs, targets, alpha_x, alpha_f, bias_correction=True):
    """The two-decay pp-prop of the squared loss at each step, as a loop over time:
    `ε_x ← α_x ε_x + a_t` per op, `ε_f ← α_f λ ⊙ ε_f + (1 − tanh² u_t)` (shared by the two
    summed ops), `n_x ← α_x n_x + 1`, `n_f ← α_f n_f + 1`, and per step
    `∇W += (g ⊙ ε_f) ⊗ ε_x / n_f`, `∇b += g ⊙ ε_f n_x / n_f` (or `(1 − α_f)` in place of
    `1/n_f` without bias correction)."""
    w, b, u = cell.input_op.weight, cell.input_op.bias, cell.recurrent_op.weight
    lam = jnp.asarray(cell.decay)

    def step(carry, inputs):
        h, ex_w, ex_u, ef, n_x, n_f, grads = carry
        x, target = inputs
        pre = w @ x + b + u @ h
        new_h = lam * h + jnp.tanh(pre)
        ex_w = alpha_x * ex_w + x
        ex_u = alpha_x * ex_u + h
        ef = alpha_f * lam * ef + (1 - jnp.tanh(pre) ** 2)
        n_x = alpha_x * n_x + 1
        n_f = alpha_f * n_f + 1
        scale = 1 / n_f if bias_correction else 1 - alpha_f
        signal = jax.grad(squared_loss)(new_h, target) * ef * scale
        update = {
            "w": jnp.outer(signal, ex_w),
            "u": jnp.outer(signal, ex_u),
            "b": signal * n_x,
        }
        grads = jtu.tree_map(jnp.add, grads, update)
        return (new_h, ex_w, ex_u, ef, n_x, n_f, grads), None

    zeros = {"w": jnp.zeros_like(w), "u": jnp.zeros_like(u), "b": jnp.zeros_like(b)}
    init = (
        jnp.zeros(HIDDEN),
        jnp.zeros(INPUT),
        jnp.zeros(HIDDEN),
        jnp.zeros(HIDDEN),
        0.0,
        0.0,
        zeros,
    )
    (*_, grads), _ = jax.lax.scan(step, init, (xs, targets))
    return grads


def _got(grads):
    return {
        "w": grads.input_op.weight,
        "u": grads.recurrent_op.weight,
        "b": grads.input_op.bias,
    }


@pytest.mark.parametrize("alpha_x, alpha_f, bias_correction", CASES)
def test_equals_the_two_decay_update_written_naively(alpha_x, alpha_f, bias_correction, getkey):
    cell = LeakyTanh(key=getkey())
    xs, targets = jr.normal(getkey(), (LENGTH, INPUT)), jr.normal(getkey(), (LENGTH, HIDDEN))
    rule = eqtrace.PPProp(
        input_decay=alpha_x, output_decay=alpha_f, bias_correction=bias_correction
    )
    online, _ = online_and_bptt(rule, cell, xs, targets)
    naive = _naive(cell, xs, targets, alpha_x, alpha_f, bias_correction)
    assert relative_error(_got(online), naive) <= 1e-12
    # Not vacuous: each decay changes the gradient.
    if alpha_x != alpha_f:
        swapped = _naive(cell, xs, targets, alpha_f, alpha_x, bias_correction)
        assert relative_error(swapped, naive) > 1e-3


def test_equal_decays_are_todays_rule(getkey):
    """`input_decay = output_decay = α` is `PPProp(α)` (and `PPProp(rank=r)`), bit for bit,
    with the same trace (no second normaliser)."""
    model = LeakyTanh(key=getkey())
    xs, targets = jr.normal(getkey(), (LENGTH, INPUT)), jr.normal(getkey(), (LENGTH, HIDDEN))
    both = eqtrace.PPProp(input_decay=0.5, output_decay=0.5)
    assert both == eqtrace.PPProp(0.5) == eqtrace.PPProp(rank=3)
    online, _ = online_and_bptt(both, model, xs, targets)
    single, _ = online_and_bptt(eqtrace.PPProp(0.5), model, xs, targets)
    assert relative_error(online, single) == 0
    x = xs[0]
    single_size = eqtrace.trace_size(eqtrace.PPProp(0.5), model, x=x).values
    assert eqtrace.trace_size(both, model, x=x).values == single_size
    # Separate decays keep one more value per cell: the input traces' normaliser.
    separate = eqtrace.PPProp(input_decay=0.5, output_decay=0.6)
    assert eqtrace.trace_size(separate, model, x=x).values == single_size + 1


def test_first_step_blocks_batch_and_jit(getkey):
    """The first step is D-RTRL's exactly (so RTRL's from any state), as for one decay; blocks
    = steps; a vmapped batch = the sum over samples; jit = no jit."""
    model = nn.Sequential(
        [nn.GRUCell(INPUT, HIDDEN, key=getkey()), nn.Linear(HIDDEN, 2, key=getkey())]
    )
    rule = eqtrace.PPProp(input_decay=0.3, output_decay=0.9)
    batch = 2
    xs = 2 * jr.normal(getkey(), (LENGTH, batch, INPUT))
    targets = jr.normal(getkey(), (LENGTH, batch, 2))
    state = random_state(np.random.default_rng(0), model)
    first, _ = online_and_bptt(rule, model, xs[:1, 0], targets[:1, 0], state=state)
    exact, _ = online_and_bptt(eqtrace.RTRL(), model, xs[:1, 0], targets[:1, 0], state=state)
    assert relative_error(first, exact) <= 1e-12

    stepped, _ = online_and_bptt(rule, model, xs[:, 0], targets[:, 0])
    assert all(bool(jnp.any(g != 0)) for g in jtu.tree_leaves(stepped))
    _, blocked, _, _ = online_in_blocks(rule, model, xs[:, 0], targets[:, 0], block_size=3)
    assert relative_error(blocked, stepped) <= 1e-12

    params, static = eqx.partition(model, eqx.is_inexact_array)
    step = jax.vmap(eqtrace.make_online_step(rule, static), in_axes=(None, 0, 0, 0))
    state, trace = eqtrace.init_state_and_trace(model, rule, batch)

    def run(step):
        return eqtrace.online_gradient(
            step, squared_loss, params, state, trace, xs, targets, reduction="sum"
        )[1]

    batched = run(step)
    second, _ = online_and_bptt(rule, model, xs[:, 1], targets[:, 1])
    assert relative_error(batched, jtu.tree_map(jnp.add, stepped, second)) <= 1e-12
    assert relative_error(run(jax.jit(step)), batched) <= 1e-12


def test_arguments():
    rule = eqtrace.PPProp(input_decay=0.2, output_decay=0.7)
    assert (rule.input_decay, rule.output_decay) == (0.2, 0.7) == rule.decay
    assert eqtrace.PPProp((0.2, 0.7)) == rule
    assert eqtrace.PPProp(rank=3).input_decay == eqtrace.PPProp(rank=3).output_decay == 0.5
    for bad in (
        dict(input_decay=0.2),
        dict(output_decay=0.2),
        dict(decay=0.5, input_decay=0.2, output_decay=0.3),
        dict(rank=3, input_decay=0.2, output_decay=0.3),
    ):
        with pytest.raises(ValueError, match="both `input_decay`"):
            eqtrace.PPProp(**bad)
    with pytest.raises(ValueError, match="a pair `decay`"):
        eqtrace.PPProp((0.2, 0.3), output_decay=0.4)
    with pytest.raises(ValueError, match=r"`output_decay` must lie in \[0, 1\)"):
        eqtrace.PPProp(input_decay=0.2, output_decay=1.0)
    with pytest.raises(ValueError, match=r"`input_decay` must lie in \[0, 1\)"):
        eqtrace.PPProp(input_decay=-0.1, output_decay=0.5)


def test_a_decay_that_rounds_to_one_is_refused():
    cell = nn.GRUCell(INPUT, HIDDEN, key=jr.key(0))
    cell = jtu.tree_map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, cell)
    state = cell.init_state()
    rule = eqtrace.PPProp(input_decay=0.5, output_decay=1 - 1e-9)
    with pytest.raises(ValueError, match="output decay α = .* rounds to 1.0 in float32"):
        rule.init_trace(cell, state, jnp.zeros(INPUT, jnp.float32))
