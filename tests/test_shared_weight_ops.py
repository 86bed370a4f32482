"""Ops whose weights reach several outputs (convolutions, low-rank products, einsums that share
a weight over an axis) and grouped ops under the weight-trace rules (D-RTRL, SnAp-1, e-prop).

Oracles, for each op under each rule: exact RTRL at the first step; the same weights written
as a dense masked `eqtrace.nn.Linear` (the Toeplitz matrix of a convolution, `W + U V` of a
low-rank op, the block-diagonal matrix of a grouped op, the einsum's matrix), over several
steps: each rule keeps one trace per (output element reached, weight), so the op's gradient
is the dense op's, pulled back through the map from the op's weights to the dense ones (a sum
over a kernel weight's copies, `G Vᵀ` and `Uᵀ G`, a gather of the blocks), exactly, not only
where the rule is exact; blocks = steps; batch = per-sample; jit = no-jit.

Each oracle takes the (op, rule) pairs of `helpers.pairs` (every op and every rule in every
run, every pair under `EQTRACE_HYPOTHESIS_PROFILE=long`); the cells, their data, their plans
and the stepped online gradient of each pair are built once and shared by the oracles.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import eqtrace
from eqtrace import nn
from helpers import LONG, pairs, relative_error, squared_loss


class OpCell(eqtrace.AbstractCell):
    """`h' = 0.5 h + tanh(op_in(x) + op_rec(h))` on a state of any shape (each op's output
    reshaped to it); with `flat`, the ops take and give flat vectors (a dense stand-in for a
    convolution)."""

    input_op: eqx.Module
    recurrent_op: eqx.Module
    shape: tuple[int, ...] = eqx.field(static=True)
    flat: bool = eqx.field(static=True, default=False)

    def init_state(self):
        return jnp.zeros(self.shape)

    def _apply(self, op, v):
        return (op(v.reshape(-1)) if self.flat else op(v)).reshape(self.shape)

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


def _conv_mixed(key):
    """A 2-d convolution (asymmetric padding) into a state `(2, 9)`, its `3 × 3` positions
    laid flat, and a 1-d recurrent convolution over them."""
    k1, k2 = jr.split(key)
    conv_in = eqx.nn.Conv2d(1, 2, kernel_size=(2, 3), padding=((1, 0), (1, 1)), key=k1)
    conv_rec = eqx.nn.Conv1d(2, 2, kernel_size=3, padding=1, key=k2)
    return OpCell(conv_in, conv_rec, (2, 9)), (1, 3, 3)


def _grouped_low_rank(key, swap=False):
    """A grouped input op and a low-rank recurrent one (`W + U V`, no bias), or with `swap`
    a low-rank input op (`U V` and a bias) and a grouped recurrent one."""
    k1, k2 = jr.split(key)
    if swap:
        ops = nn.LowRankLinear(4, 6, 2, key=k1), nn.GroupedLinear(6, 6, 3, key=k2)
    else:
        ops = (
            nn.GroupedLinear(4, 6, 2, key=k1),
            nn.LowRankLinear(6, 6, 2, full_rank=True, use_bias=False, key=k2),
        )
    return OpCell(*ops, (6,)), (4,)


def _einsum(key, swap=False):
    """On a state `(t, o)`: an input op whose weights each reach one output (a weight letter
    `k` summed alone, a unit axis of its traces) and a recurrent op whose weights reach every
    position `t` (a trace per (position, weight)); with `swap`, the other way round."""
    k1, k2 = jr.split(key)
    if swap:
        ops = (
            nn.EinsumLinear("ti,oi->to", (3, 2), (2, 2), key=k1),
            nn.EinsumLinear("ti,toi->to", (3, 2), (3, 2, 2), use_bias=False, key=k2),
        )
        return OpCell(*ops, (3, 2)), (3, 2)
    ops = (
        nn.EinsumLinear("i,toik->to", (4,), (3, 2, 4, 2), key=k1),
        nn.EinsumLinear("ti,oi->to", (3, 2), (2, 2), key=k2),
    )
    return OpCell(*ops, (3, 2)), (4,)


# Each op type in every run; under LONG also each op in the other role, and the convolutions
# of one dimension each.
OPS = {"conv": _conv_mixed, "grouped+low-rank": _grouped_low_rank, "einsum": _einsum}
if LONG:
    OPS["conv1d"], OPS["conv2d"] = _conv, _conv2d
    OPS["low-rank+grouped"] = functools.partial(_grouped_low_rank, swap=True)
    OPS["einsum-swapped"] = functools.partial(_einsum, swap=True)
RULES = {
    "drtrl": eqtrace.DRTRL,
    "snap1": eqtrace.SnAp1,
    "eprop": lambda: eqtrace.EProp(readout_decay=0.6),
}
PAIRS = pairs(list(OPS), list(RULES))
LENGTH = 4  # steps of the multi-step oracles: two blocks of 2


@functools.cache
def _case(op):
    """The op's cell, its input shape, and a non-zero state, inputs and targets (NumPy draws:
    `jr.normal` would compile once per shape)."""
    cell, x_shape = OPS[op](jr.key(0))
    rng = np.random.default_rng(1)
    state = jnp.asarray(rng.standard_normal(cell.shape))
    xs = jnp.asarray(rng.standard_normal((LENGTH, *x_shape)))
    targets = jnp.asarray(rng.standard_normal((LENGTH, *cell.shape)))
    return cell, x_shape, state, xs, targets


@functools.cache
def _online_step(op, rule, cell_kind="op"):
    """A rule's online step for the op's cell (or its dense stand-in), prepared once."""
    cell = _cell(op, cell_kind)
    algorithm = RULES[rule]()
    _, x_shape, *_ = _case(op)
    plan = eqtrace.prepare(algorithm, cell, jnp.zeros(x_shape))
    static = eqx.partition(cell, eqx.is_inexact_array)[1]
    return algorithm, plan, eqtrace.make_online_step(algorithm, static, plan=plan)


def _online(op, rule, xs, targets, state, cell_kind="op", weights=None):
    """The summed per-step online gradient of a rule over `xs` (no BPTT alongside), with the
    steps' losses weighted by `weights` (default ones: always weighted, so that the first-step
    oracle, a loss on the first step only, runs the program of the other oracles)."""
    algorithm, plan, step = _online_step(op, rule, cell_kind)
    cell = _cell(op, cell_kind)
    params = eqx.filter(cell, eqx.is_inexact_array)
    trace = algorithm.init_trace(cell, state, plan=plan)
    _, grads, _, _ = eqtrace.online_gradient(
        step,
        squared_loss,
        params,
        state,
        trace,
        xs,
        targets,
        reduction="sum",
        step_weights=jnp.ones(len(xs)) if weights is None else weights,
    )
    return grads


@functools.cache
def _stepped(op, rule):
    """The rule's online gradient over the case's sequence, step by step: shared by the
    dense, block, batch and jit oracles."""
    _, _, state, xs, targets = _case(op)
    return _online(op, rule, xs, targets, state)


@functools.cache
def _rtrl_step(op):
    static = eqx.partition(_cell(op, "op"), eqx.is_inexact_array)[1]
    return eqtrace.make_online_step(eqtrace.RTRL(), static)


def _rtrl(op, weights):
    """Exact RTRL over the case's sequence, the steps' losses weighted by `weights` (one
    program for the first-step oracle and the dense one's check that it is not vacuous)."""
    cell, _, state, xs, targets = _case(op)
    return eqtrace.online_gradient(
        _rtrl_step(op),
        squared_loss,
        eqx.filter(cell, eqx.is_inexact_array),
        state,
        eqtrace.RTRL().init_trace(cell, state, xs[0]),
        xs,
        targets,
        reduction="sum",
        step_weights=weights,
    )[1]


def _dense_params(op, in_shape):
    """The dense weight `(|u|, |a|)` and bias `(|u|,)` of a linear op, differentiable in the
    op's arrays."""
    zeros = jnp.zeros(in_shape)
    weight = jax.jacfwd(lambda a: op(a) - op(zeros))(zeros)
    bias = op(zeros)
    return weight.reshape(bias.size, -1), bias.reshape(-1)


def _cell_dense_params(ops, x_shape, shape):
    """`_dense_params` of a cell's (input op, recurrent op)."""
    return _dense_params(ops[0], x_shape), _dense_params(ops[1], shape)


@eqx.filter_jit  # One program for both ops (eagerly, a Jacobian is dozens of small ones).
def _as_dense(cell, x_shape):
    """The dense masked stand-in of the cell: its ops' matrices, masked to their structural
    zeros (at random weights), in flat `eqtrace.nn.Linear`s."""
    ops = []
    for (weight, bias), key in zip(
        _cell_dense_params((cell.input_op, cell.recurrent_op), x_shape, cell.shape),
        (jr.key(5), jr.key(6)),
    ):
        linear = nn.Linear(weight.shape[1], weight.shape[0], mask=weight != 0, key=key)
        ops.append(eqx.tree_at(lambda m: (m.weight, m.bias), linear, (weight, bias)))
    return OpCell(*ops, cell.shape, flat=True)


@eqx.filter_jit
def _pulled_back(cell, x_shape, dense_grad):
    """The gradient of the cell's ops' arrays from the dense stand-in's, through the map
    between them."""
    ops = (cell.input_op, cell.recurrent_op)
    params, static = eqx.partition(ops, eqx.is_inexact_array)
    _, pullback = jax.vjp(
        lambda p: _cell_dense_params(eqx.combine(p, static), x_shape, cell.shape), params
    )
    dense = (dense_grad.input_op, dense_grad.recurrent_op)
    (grad,) = pullback(tuple((d.weight, d.bias) for d in dense))
    return grad


@functools.cache
def _cell(op, kind):
    """The op's cell (`"op"`), its dense masked stand-in (`"dense"`), or the cell without its
    recurrent op (`"no-recurrence"`)."""
    cell, x_shape, *_ = _case(op)
    if kind == "dense":
        return _as_dense(cell, x_shape)
    if kind == "no-recurrence":
        return eqx.tree_at(lambda c: c.recurrent_op, cell, _Zero())
    return cell


class _Zero(eqx.Module):
    def __call__(self, v):
        return jnp.zeros_like(v)


@pytest.mark.parametrize("op, rule", PAIRS)
def test_first_step_equals_rtrl(op, rule):
    """The loss on the first step only (the later steps weighted 0)."""
    _, _, state, xs, targets = _case(op)
    first = jnp.ones(LENGTH).at[1:].set(0)  # the dtype of the other oracles' weights
    online = _online(op, rule, xs, targets, state, weights=first)
    exact = _rtrl(op, first)
    assert relative_error(online, exact) <= 1e-12
    assert all(bool(jnp.any(g != 0)) for g in jtu.tree_leaves(exact))  # not two zeros


@pytest.mark.parametrize("op, rule", PAIRS)
def test_equals_the_dense_masked_op(op, rule):
    cell, x_shape, state, xs, targets = _case(op)
    online = _stepped(op, rule)
    dense_online = _online(op, rule, xs, targets, state, cell_kind="dense")
    expected = eqx.tree_at(
        lambda c: (c.input_op, c.recurrent_op),
        online,
        _pulled_back(cell, x_shape, dense_online),
    )
    assert relative_error(online, expected) <= 1e-10
    # Not vacuous: with recurrent ops the rules are approximations.
    assert relative_error(online, _rtrl(op, jnp.ones(LENGTH))) > 1e-3


@pytest.mark.parametrize("op", OPS)
def test_exact_without_recurrent_op(op):
    """With only the input op (an element-wise recurrence), D-RTRL equals BPTT."""
    cell, _, state, xs, targets = _case(op)
    cell = _cell(op, "no-recurrence")
    online = _online(op, "drtrl", xs, targets, state, cell_kind="no-recurrence")
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    _, bptt, _ = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(static),
        squared_loss,
        params,
        state,
        xs,
        targets,
        reduction="sum",
    )
    assert relative_error(online.input_op, bptt.input_op) <= 1e-10


@pytest.mark.parametrize("op, rule", PAIRS)
def test_blocks_equal_steps(op, rule):
    cell, _, state, xs, targets = _case(op)
    algorithm, plan, _ = _online_step(op, rule)
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    _, blocked, _, _ = eqtrace.online_gradient(
        eqtrace.make_online_block(algorithm, static, plan=plan),
        squared_loss,
        params,
        state,
        algorithm.init_trace(cell, state, plan=plan),
        xs,
        targets,
        block_size=2,  # two blocks: the trace carried across
        reduction="sum",
    )
    assert relative_error(blocked, _stepped(op, rule)) <= 1e-10


@pytest.mark.parametrize("op, rule", PAIRS)
def test_batch_equals_per_sample(op, rule):
    """A batch of the case's sample and a second one: the mean of the per-sample gradients."""
    cell, _, state, xs, targets = _case(op)
    algorithm, plan, step = _online_step(op, rule)
    params = eqx.filter(cell, eqx.is_inexact_array)
    other = (-0.5 * state, xs[::-1], 0.3 * targets)
    states, batch_xs, batch_targets = (
        jnp.stack(pair, axis=i) for pair, i in zip(zip((state, xs, targets), other), (0, 1, 1))
    )
    trace = jtu.tree_map(
        lambda *t: jnp.stack(t), *(algorithm.init_trace(cell, s, plan=plan) for s in states)
    )
    _, batched, _, _ = eqtrace.online_gradient(
        jax.vmap(step, in_axes=(None, 0, 0, 0)),
        lambda y, t: jnp.sum((y - t) ** 2) / 2,
        params,
        states,
        trace,
        batch_xs,
        batch_targets,
        reduction="sum",
        step_weights=jnp.ones(LENGTH),
    )
    per_sample = [_stepped(op, rule), _online(op, rule, other[1], other[2], other[0])]
    mean = jtu.tree_map(lambda *g: sum(g) / 2, *per_sample)
    assert relative_error(batched, mean) <= 1e-12


@pytest.mark.parametrize("op, rule", PAIRS)
def test_jit_equals_no_jit(op, rule):
    """Under `jit` the step prepares its own plan from abstract arrays; without, the plan was
    prepared from the concrete cell: the same gradient."""
    cell, _, state, xs, targets = _case(op)
    algorithm = RULES[rule]()
    params, static = eqx.partition(cell, eqx.is_inexact_array)

    @jax.jit
    def jitted(params, state, xs, targets):
        trace = algorithm.init_trace(eqx.combine(params, static), state, xs[0])
        step = eqtrace.make_online_step(algorithm, static)
        return eqtrace.online_gradient(
            step,
            squared_loss,
            params,
            state,
            trace,
            xs,
            targets,
            reduction="sum",
            step_weights=jnp.ones(LENGTH),
        )[1]

    assert relative_error(jitted(params, state, xs, targets), _stepped(op, rule)) <= 1e-12


def test_trace_layout_and_memory():
    """The layout comes from the op's structure: a trace per (output position, kernel
    weight) for a convolution and for an einsum's weight shared over positions, `(out, rank,
    in)` for `V`, weight-shaped for `U`, `W`, a grouped op and an einsum whose weights each
    reach one output; `check` and `trace_size` count it."""
    cell, x_shape, *_ = _case("conv")
    trace = eqtrace.DRTRL().init_trace(cell, cell.init_state(), jnp.zeros(x_shape))
    conv_in, conv_rec = trace.ops
    assert conv_in.weight.shape == (9, 2, 1, 2, 3, 1)  # (positions, C_out, C_in, kernel, K)
    assert conv_rec.weight.shape == (9, 2, 2, 3, 1) and conv_rec.bias.shape == (9, 2, 1, 1)
    size = eqtrace.trace_size(eqtrace.DRTRL(), cell, jnp.zeros(x_shape))
    assert size.values == 2 * (9 * 2 * 2 * 3 + 9 * 2)
    report = str(eqtrace.check(cell, eqtrace.DRTRL(), jnp.zeros(x_shape)))
    # Taps that meet the padding reach fewer positions: 2 · (2 + 3)(2 + 3 + 2) pairs of the
    # 2-d kernel; 108 − 2 · 2 · 2 of the 1-d one (its edge taps miss one position each).
    assert "`.weight`: 70 (output, weight) pairs in 9 output colours" in report, report
    assert "`.weight`: 100 (output, weight) pairs in 9 output colours" in report, report
    cell, x_shape, *_ = _case("grouped+low-rank")
    trace = eqtrace.DRTRL().init_trace(cell, cell.init_state(), jnp.zeros(x_shape))
    assert trace.ops[0].weight.shape == (2, 3, 2, 1)  # (groups, out/groups, in/groups, K)
    low_rank = trace.ops[1]
    assert low_rank.weight.shape == (6, 6, 1) and low_rank.u.shape == (6, 2, 1)
    assert low_rank.v.shape == (6, 2, 6, 1)  # (out, rank, in, K)
    cell, x_shape, *_ = _case("einsum")
    trace = eqtrace.DRTRL().init_trace(cell, cell.init_state(), jnp.zeros(x_shape))
    assert trace.ops[0].weight.shape == (3, 2, 4, 2, 1)  # weight-shaped
    assert trace.ops[1].weight.shape == (3, 2, 2, 1)  # (positions t, *W.shape, K)
    assert trace.ops[1].bias.shape == (3, 2, 1)
