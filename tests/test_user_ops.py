"""Synaptic ops registered by the user: `eqtrace.register_op` with the derived `OpAlgebra`.

A sparse op (each weight reaches one output) and a low-rank op `U (V a)` (the weights of `V`
reach every output: a trace per (output, weight)) are traced by D-RTRL and pp-prop. Every case
equals exact RTRL at the first step, through the trace path, stepping and in blocks.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import eqtrace
from helpers import online_and_bptt, relative_error


class SparseLinear(eqx.Module):
    """`u_i = Σ_{(i, j) ∈ S} w_ij a_j + b_i` with a fixed sparsity pattern in COO form."""

    values: jax.Array
    bias: jax.Array
    rows: tuple[int, ...] = eqx.field(static=True)  # hashable: static fields are compared
    cols: tuple[int, ...] = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(self, in_features, out_features, density, *, key):
        wkey, mkey = jr.split(key)
        mask = np.array(jr.bernoulli(mkey, density, (out_features, in_features)))
        mask[np.arange(out_features), np.arange(out_features) % in_features] = True
        self.rows, self.cols = (tuple(int(i) for i in index) for index in np.nonzero(mask))
        self.values = jr.normal(wkey, (len(self.rows),)) / np.sqrt(in_features)
        self.bias = jnp.zeros(out_features)
        self.out_features = out_features

    def __call__(self, a):
        contributions = self.values * a[np.asarray(self.cols)]
        rows = np.asarray(self.rows)
        return jax.ops.segment_sum(contributions, rows, self.out_features) + self.bias


class LowRank(eqx.Module):
    """`u = U (V a)`: rank `r`, linear in `U` and in `V` separately."""

    u: jax.Array
    v: jax.Array

    def __init__(self, in_features, out_features, rank, *, key):
        ukey, vkey = jr.split(key)
        self.u = jr.normal(ukey, (out_features, rank)) / np.sqrt(rank)
        self.v = jr.normal(vkey, (rank, in_features)) / np.sqrt(in_features)

    def __call__(self, a):
        return self.u @ (self.v @ a)


eqtrace.register_op(SparseLinear)
eqtrace.register_op(LowRank)


class UserOpRNN(eqtrace.AbstractCell):
    """`h' = tanh(op_in(x) + op_rec(h))` with user-defined ops for both projections."""

    input_op: eqx.Module
    recurrent_op: eqx.Module
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, make_op, input_size, hidden_size, *, key):
        ikey, rkey = jr.split(key)
        self.input_op = make_op(input_size, hidden_size, key=ikey)
        self.recurrent_op = make_op(hidden_size, hidden_size, key=rkey)
        self.input_size, self.hidden_size = input_size, hidden_size

    def init_state(self):
        return jnp.zeros(self.hidden_size)

    def __call__(self, state, x):
        new_state = jnp.tanh(self.input_op(x) + self.recurrent_op(state))
        return new_state, self.output(new_state)

    def output(self, state):
        return state


def _sparse(i, o, *, key):
    return SparseLinear(i, o, 0.4, key=key)


def _low_rank(i, o, *, key):
    return LowRank(i, o, 2, key=key)


def _first_step_error(algorithm, model, key):
    state = jr.normal(key, (model.hidden_size,))
    xs = jr.normal(jr.fold_in(key, 1), (1, 3))
    targets = jr.normal(jr.fold_in(key, 2), (1, model.hidden_size))
    online, _ = online_and_bptt(algorithm, model, xs, targets, state=state)
    exact, _ = online_and_bptt(eqtrace.RTRL(), model, xs, targets, state=state)
    return relative_error(online, exact)


@pytest.mark.parametrize(
    "algorithm, make_op",
    [
        (eqtrace.DRTRL(), _sparse),
        (eqtrace.PPProp(rank=4), _sparse),
        (eqtrace.PPProp(rank=4), _low_rank),
        (eqtrace.DRTRL(), _low_rank),
        (eqtrace.SnAp1(), _low_rank),
    ],
    ids=["drtrl-sparse", "ppprop-sparse", "ppprop-lowrank", "drtrl-lowrank", "snap1-lowrank"],
)
def test_registered_op_first_step_equals_rtrl(algorithm, make_op):
    model = UserOpRNN(make_op, 3, 5, key=jr.key(0))
    assert _first_step_error(algorithm, model, jr.key(1)) <= 1e-12


def test_drtrl_sparse_op_equals_dense_masked_op():
    """Over many steps, D-RTRL with the sparse op equals D-RTRL with the same weights held in
    a masked `eqtrace.nn.Linear` (the built-in, hand-fused algebra)."""
    sparse_model = UserOpRNN(_sparse, 3, 5, key=jr.key(0))

    def dense(op):
        weight = jnp.zeros((op.out_features, max(op.cols) + 1))
        index = (np.asarray(op.rows), np.asarray(op.cols))
        weight = weight.at[index].set(op.values)
        mask = jnp.zeros(weight.shape, bool).at[index].set(True)
        linear = eqtrace.nn.Linear(weight.shape[1], weight.shape[0], mask=mask, key=jr.key(0))
        return eqx.tree_at(lambda m: (m.weight, m.bias), linear, (weight, op.bias))

    dense_model = eqx.tree_at(
        lambda m: (m.input_op, m.recurrent_op),
        sparse_model,
        (dense(sparse_model.input_op), dense(sparse_model.recurrent_op)),
    )
    xs = jr.normal(jr.key(2), (6, 3))
    targets = jr.normal(jr.key(3), (6, 5))
    sparse_grads, _ = online_and_bptt(eqtrace.DRTRL(), sparse_model, xs, targets)
    dense_grads, _ = online_and_bptt(eqtrace.DRTRL(), dense_model, xs, targets)
    for name in ("input_op", "recurrent_op"):
        sparse_op, dense_op = getattr(sparse_grads, name), getattr(dense_grads, name)
        op = getattr(sparse_model, name)
        rows, cols = np.asarray(op.rows), np.asarray(op.cols)
        np.testing.assert_allclose(sparse_op.values, dense_op.weight[rows, cols], rtol=1e-10)
        np.testing.assert_allclose(sparse_op.bias, dense_op.bias, rtol=1e-10)


@pytest.mark.parametrize("algorithm", [eqtrace.DRTRL(), eqtrace.PPProp(rank=4)])
def test_registered_op_blocks_equal_steps(algorithm):
    model = UserOpRNN(_sparse, 3, 5, key=jr.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm)
    xs = jr.normal(jr.key(2), (6, 3))
    targets = jr.normal(jr.key(3), (6, 5))

    def loss(y, target):
        return jnp.sum((y - target) ** 2)

    step = eqtrace.make_online_step(algorithm, static)
    block = eqtrace.make_online_block(algorithm, static)
    _, stepped, _, _ = eqtrace.online_gradient(
        step, loss, params, state, trace, xs, targets, reduction="sum"
    )
    _, blocked, _, _ = eqtrace.online_gradient(
        block, loss, params, state, trace, xs, targets, block_size=4, reduction="sum"
    )
    assert relative_error(blocked, stepped) <= 1e-10


def test_drtrl_traces_an_op_whose_weights_reach_many_outputs():
    """The derived algebra's layout comes from the op's code: `V`'s trace holds one value per
    (output, weight), and `check` counts it; the user's op equals the built-in
    `eqtrace.nn.LowRankLinear` (hand-fused algebra) over many steps."""
    model = UserOpRNN(_low_rank, 3, 5, key=jr.key(0))
    report = eqtrace.check(model, eqtrace.DRTRL())
    assert report.ok and "`.v`: 30 (output, weight) pairs" in str(report), str(report)

    def builtin(op):
        new = eqtrace.nn.LowRankLinear(
            op.v.shape[1], op.u.shape[0], 2, use_bias=False, key=jr.key(0)
        )
        return eqx.tree_at(lambda m: (m.u, m.v), new, (op.u, op.v))

    other = eqx.tree_at(
        lambda m: (m.input_op, m.recurrent_op),
        model,
        (builtin(model.input_op), builtin(model.recurrent_op)),
    )
    xs, targets = jr.normal(jr.key(2), (5, 3)), jr.normal(jr.key(3), (5, 5))
    user, _ = online_and_bptt(eqtrace.DRTRL(), model, xs, targets)
    fused, _ = online_and_bptt(eqtrace.DRTRL(), other, xs, targets)
    for name in ("input_op", "recurrent_op"):
        mine, theirs = getattr(user, name), getattr(fused, name)
        assert relative_error((mine.u, mine.v), (theirs.u, theirs.v)) <= 1e-10


def test_register_op_rejects_what_is_not_an_algebra():
    # eqtrace's own check, or a runtime type checker's on the annotation: both name `algebra`.
    with pytest.raises(TypeError, match="algebra"):
        eqtrace.register_op(LowRank, object())


def test_a_custom_algebra_overrides_the_derived_one():
    """A user algebra that spreads by hand (as the built-ins do, for speed) gives the same."""

    class FastSparse(SparseLinear):
        pass

    class FastSparseAlgebra(eqtrace.OpAlgebra):
        def spread(self, op, a, v):
            del a
            params = eqx.filter(op, eqx.is_inexact_array)
            return eqx.tree_at(lambda p: (p.values, p.bias), params, (v[np.asarray(op.rows)], v))

    eqtrace.register_op(FastSparse, FastSparseAlgebra())

    def fast(i, o, *, key):
        return _as(FastSparse, _sparse(i, o, key=key))

    model = UserOpRNN(fast, 3, 5, key=jr.key(0))
    assert _first_step_error(eqtrace.DRTRL(), model, jr.key(1)) <= 1e-12
    slow = UserOpRNN(_sparse, 3, 5, key=jr.key(0))
    xs, targets = jr.normal(jr.key(2), (4, 3)), jr.normal(jr.key(3), (4, 5))
    fast_grads, _ = online_and_bptt(eqtrace.DRTRL(), model, xs, targets)
    slow_grads, _ = online_and_bptt(eqtrace.DRTRL(), slow, xs, targets)
    assert relative_error(jtu.tree_leaves(fast_grads), jtu.tree_leaves(slow_grads)) <= 1e-12


def _as(cls, op):
    """A copy of `op` as an instance of its subclass `cls`."""
    new = object.__new__(cls)
    for field in ("values", "bias", "rows", "cols", "out_features"):
        object.__setattr__(new, field, getattr(op, field))
    return new
