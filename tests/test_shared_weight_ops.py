"""Ops whose weights reach several outputs (convolutions, low-rank products) and grouped ops
under the weight-trace rules (D-RTRL, SnAp-1, e-prop).

Oracles, for each op under each rule: exact RTRL at the first step; the same weights written
as a dense masked `eqtrace.nn.Linear` (the Toeplitz matrix of a convolution, `W + U V` of a
low-rank op, the block-diagonal matrix of a grouped op), over many steps: each rule keeps one
trace per (output element reached, weight), so the op's gradient is the dense op's, pulled
back through the map from the op's weights to the dense ones (a sum over a kernel weight's
copies, `G Vᵀ` and `Uᵀ G`, a gather of the blocks), exactly, not only where the rule is
exact; blocks = steps; batch = per-sample; jit = no-jit.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

import eqtrace
from eqtrace import nn
from helpers import online_and_bptt, online_in_blocks, relative_error


class OpCell(eqtrace.AbstractCell):
    """`h' = 0.5 h + tanh(op_in(x) + op_rec(h))` on a state of any shape; with `flat`, the
    ops take and give flat vectors (a dense stand-in for a convolution)."""

    input_op: eqx.Module
    recurrent_op: eqx.Module
    shape: tuple[int, ...] = eqx.field(static=True)
    flat: bool = eqx.field(static=True, default=False)

    def init_state(self):
        return jnp.zeros(self.shape)

    def _apply(self, op, v):
        return op(v.reshape(-1)).reshape(self.shape) if self.flat else op(v)

    def __call__(self, state, x):
        u = self._apply(self.input_op, x) + self._apply(self.recurrent_op, state)
        h = 0.5 * state + jnp.tanh(u)
        return h, h


def _conv(key):
    k1, k2 = jr.split(key)
    conv_in = eqx.nn.Conv1d(2, 3, kernel_size=3, padding=1, key=k1)
    conv_rec = eqx.nn.Conv1d(3, 3, kernel_size=3, padding=1, key=k2)
    return OpCell(conv_in, conv_rec, (3, 6)), (2, 6)


def _conv2d(key):
    k1, k2 = jr.split(key)
    conv_in = eqx.nn.Conv2d(1, 2, kernel_size=(2, 3), padding=((1, 0), (1, 1)), key=k1)
    conv_rec = eqx.nn.Conv2d(2, 2, kernel_size=1, key=k2)
    return OpCell(conv_in, conv_rec, (2, 3, 3)), (1, 3, 3)


def _grouped(key):
    k1, k2 = jr.split(key)
    ops = nn.GroupedLinear(4, 6, 2, key=k1), nn.GroupedLinear(6, 6, 3, key=k2)
    return OpCell(*ops, (6,)), (4,)


def _low_rank(key):
    k1, k2 = jr.split(key)
    ops = (
        nn.LowRankLinear(4, 5, 2, full_rank=True, key=k1),
        nn.LowRankLinear(5, 5, 2, use_bias=False, key=k2),
    )
    return OpCell(*ops, (5,)), (4,)


OPS = {"conv": _conv, "conv2d": _conv2d, "grouped": _grouped, "low-rank": _low_rank}
RULES = {
    "drtrl": eqtrace.DRTRL,
    "snap1": eqtrace.SnAp1,
    "eprop": lambda: eqtrace.EProp(readout_decay=0.6),
}


def _data(key, x_shape, shape, length):
    k1, k2, k3 = jr.split(key, 3)
    return (
        jr.normal(k1, shape),
        jr.normal(k2, (length, *x_shape)),
        jr.normal(k3, (length, *shape)),
    )


def _dense_params(op, in_shape):
    """The dense weight `(|u|, |a|)` and bias `(|u|,)` of a linear op, differentiable in the
    op's arrays."""
    zeros = jnp.zeros(in_shape)
    weight = jax.jacfwd(lambda a: op(a) - op(zeros))(zeros)
    bias = op(zeros)
    return weight.reshape(bias.size, -1), bias.reshape(-1)


def _as_dense(op, in_shape, key):
    weight, bias = _dense_params(op, in_shape)
    mask = weight != 0  # the structural zeros, at random weights
    linear = nn.Linear(weight.shape[1], weight.shape[0], mask=mask, key=key)
    return eqx.tree_at(lambda m: (m.weight, m.bias), linear, (weight, bias))


def _pulled_back(op, in_shape, dense_grad):
    """The gradient of the op's arrays from the dense op's, through the map between them."""
    params, static = eqx.partition(op, eqx.is_inexact_array)
    _, pullback = jax.vjp(lambda p: _dense_params(eqx.combine(p, static), in_shape), params)
    (grad,) = pullback((dense_grad.weight, dense_grad.bias))
    return grad


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("op", OPS)
def test_first_step_equals_rtrl(op, rule):
    cell, x_shape = OPS[op](jr.key(0))
    state, xs, targets = _data(jr.key(1), x_shape, cell.shape, 1)
    online, _ = online_and_bptt(RULES[rule](), cell, xs, targets, state=state)
    exact, _ = online_and_bptt(eqtrace.RTRL(), cell, xs, targets, state=state)
    assert relative_error(online, exact) <= 1e-12


@pytest.mark.parametrize(
    "op, rule",
    [("conv", "drtrl"), ("conv", "snap1"), ("conv2d", "eprop"), ("grouped", "snap1")]
    + [("grouped", "eprop"), ("low-rank", "drtrl"), ("low-rank", "eprop")],
)
def test_equals_the_dense_masked_op(op, rule):
    cell, x_shape = OPS[op](jr.key(0))
    dense = OpCell(
        _as_dense(cell.input_op, x_shape, jr.key(5)),
        _as_dense(cell.recurrent_op, cell.shape, jr.key(6)),
        cell.shape,
        flat=True,
    )
    state, xs, targets = _data(jr.key(1), x_shape, cell.shape, 5)
    online, bptt = online_and_bptt(RULES[rule](), cell, xs, targets, state=state)
    dense_online, _ = online_and_bptt(RULES[rule](), dense, xs, targets, state=state)
    expected = eqx.tree_at(
        lambda c: (c.input_op, c.recurrent_op),
        online,
        (
            _pulled_back(cell.input_op, x_shape, dense_online.input_op),
            _pulled_back(cell.recurrent_op, cell.shape, dense_online.recurrent_op),
        ),
    )
    assert relative_error(online, expected) <= 1e-10
    # Not vacuous: with recurrent ops the rules are approximations.
    assert relative_error(online, bptt) > 1e-3


@pytest.mark.parametrize("op", OPS)
def test_exact_without_recurrent_op(op):
    """With only the input op (an element-wise recurrence), D-RTRL equals BPTT."""
    cell, x_shape = OPS[op](jr.key(0))
    cell = eqx.tree_at(lambda c: c.recurrent_op, cell, _Zero())
    state, xs, targets = _data(jr.key(1), x_shape, cell.shape, 4)
    online, bptt = online_and_bptt(eqtrace.DRTRL(), cell, xs, targets, state=state)
    assert relative_error(online.input_op, bptt.input_op) <= 1e-10


class _Zero(eqx.Module):
    def __call__(self, v):
        return jnp.zeros_like(v)


@pytest.mark.parametrize("rule", ["drtrl", "eprop"])
@pytest.mark.parametrize("op", ["conv", "low-rank"])
def test_blocks_equal_steps(op, rule):
    cell, x_shape = OPS[op](jr.key(0))
    state, xs, targets = _data(jr.key(1), x_shape, cell.shape, 5)
    stepped, _ = online_and_bptt(RULES[rule](), cell, xs, targets, state=state)
    _, blocked, _, _ = online_in_blocks(RULES[rule](), cell, xs, targets, 3, state=state)
    assert relative_error(blocked, stepped) <= 1e-10


@pytest.mark.parametrize("op", ["conv", "low-rank"])
def test_batch_equals_per_sample(op):
    algorithm = eqtrace.DRTRL()
    cell, x_shape = OPS[op](jr.key(0))
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    batch, length = 2, 3
    xs = jr.normal(jr.key(1), (length, batch, *x_shape))
    targets = jr.normal(jr.key(2), (length, batch, *cell.shape))
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    state, trace = eqtrace.init_state_and_trace(cell, algorithm, batch, x=xs[0, 0])
    _, batched, _, _ = eqtrace.online_gradient(
        step,
        lambda y, t: jnp.sum((y - t) ** 2) / batch,
        params,
        state,
        trace,
        xs,
        targets,
        reduction="sum",
    )
    per_sample = [
        online_and_bptt(algorithm, cell, xs[:, b], targets[:, b], state=state[b])[0]
        for b in range(batch)
    ]
    mean = jtu.tree_map(lambda *g: sum(g) / batch, *per_sample)
    assert relative_error(batched, mean) <= 1e-12


@pytest.mark.parametrize("op", ["conv", "low-rank"])
def test_jit_equals_no_jit(op):
    algorithm = eqtrace.SnAp1()
    cell, x_shape = OPS[op](jr.key(0))
    state, xs, _ = _data(jr.key(1), x_shape, cell.shape, 2)
    trace = algorithm.init_trace(cell, state, xs[0])
    _, trace, _ = algorithm.step(cell, state, trace, xs[0])
    eager = algorithm.step(cell, state, trace, xs[1])
    jitted = eqx.filter_jit(algorithm.step)(cell, state, trace, xs[1])
    assert relative_error(jitted, eager) <= 1e-12


def test_trace_layout_and_memory():
    """The layout comes from the op's structure: a trace per (output position, kernel
    weight) for a convolution, `(out, rank, in)` for `V`, weight-shaped for `U`, `W` and a
    grouped op; `check` and `trace_size` count it."""
    cell, x_shape = _conv(jr.key(0))
    trace = eqtrace.DRTRL().init_trace(cell, cell.init_state(), jnp.zeros(x_shape))
    conv_in = trace.ops[0]
    assert conv_in.weight.shape == (6, 3, 2, 3, 1)  # (positions, C_out, C_in, kernel, K)
    assert conv_in.bias.shape == (6, 3, 1, 1)
    cell, x_shape = _low_rank(jr.key(0))
    trace = eqtrace.DRTRL().init_trace(cell, cell.init_state(), jnp.zeros(x_shape))
    low_rank = trace.ops[0]
    assert low_rank.weight.shape == (5, 4, 1) and low_rank.u.shape == (5, 2, 1)
    assert low_rank.v.shape == (5, 2, 4, 1)  # (out, rank, in, K)
    cell, x_shape = _grouped(jr.key(0))
    trace = eqtrace.DRTRL().init_trace(cell, cell.init_state(), jnp.zeros(x_shape))
    assert trace.ops[0].weight.shape == (2, 3, 2, 1)
    cell, x_shape = _conv(jr.key(0))
    size = eqtrace.trace_size(eqtrace.DRTRL(), cell, jnp.zeros(x_shape))
    conv_values = (6 * 3 * 2 * 3 + 6 * 3) + (6 * 3 * 3 * 3 + 6 * 3)
    assert size.values == conv_values
    report = str(eqtrace.check(cell, eqtrace.DRTRL(), jnp.zeros(x_shape)))
    # Edge taps of the padded kernel reach one position fewer: 108 - 2·3·2 pairs.
    assert "`.weight`: 96 (output, weight) pairs in 6 output colours" in report, report
