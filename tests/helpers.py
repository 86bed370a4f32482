import itertools
import os
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import eqtrace
from eqtrace import nn


#: The one opt-in switch for long runs, `EQTRACE_HYPOTHESIS_PROFILE=long`: hypothesis's long
#: profiles, and the full products of `pairs`.
LONG = os.environ.get("EQTRACE_HYPOTHESIS_PROFILE") == "long"


_PARAM = type(pytest.param(None))


def pairs(first: Sequence, second: Sequence) -> list:
    """`pytest.param`s pairing `first` with `second` (values or `pytest.param`s): by default
    each entry of either list at least once, rotating through both (`max(len)` pairs); every
    pair under `LONG`. Rotation keeps every kind of oracle on every rule and every cell at a
    fraction of the full product's compilations."""

    def split(entry):
        if isinstance(entry, _PARAM):
            (value,) = entry.values
            return value, entry.id
        return entry, getattr(entry, "__name__", str(entry))

    if LONG:
        chosen = list(itertools.product(first, second))
    else:
        length = max(len(first), len(second))
        chosen = [(first[i % len(first)], second[i % len(second)]) for i in range(length)]
    params = []
    for a, b in chosen:
        (a, a_id), (b, b_id) = split(a), split(b)
        params.append(pytest.param(a, b, id=f"{a_id}-{b_id}"))
    return params


def alternate(params: Sequence, parity: int) -> list:
    """Every other entry of `params` (from index `parity`), every entry under `LONG`: two
    oracles of the same kind over one list of rules, one taking the even entries and the other
    the odd ones, still hold every rule to one of them in every run."""
    return list(params) if LONG else list(params)[parity::2]


def key_data(tree: Any) -> Any:
    """`tree` with its PRNG keys (which NumPy cannot convert) replaced by their raw data."""

    def data(leaf):
        if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jr.key_data(leaf).astype(np.float64)
        return leaf

    return jtu.tree_map(data, tree)


def tree_allclose(x: Any, y: Any, *, rtol: float = 1e-9, atol: float = 0.0) -> bool:
    """Whether two pytrees have the same structure and all leaves are close."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    x, y = key_data(x), key_data(y)
    # NumPy rather than jax.numpy: eager JAX ops compile once per shape, which adds up.
    return all(
        a.shape == b.shape and bool(np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol))
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    )


def low_rank_products(tree: Any) -> Any:
    """`tree` with each `LowRankRTRLTrace` replaced by what it means, its base trace and its
    correction `U Vᵀ`, the latter offset by the base trace's largest magnitude so that
    `relative_error` measures it on the scale of the influence it corrects. The factors
    themselves are defined up to the signs of their columns (and a rotation where the kept
    directions' weights tie), and where the base rule drops nothing (an element-wise cell) they
    hold round-off, whose directions and relative size mean nothing: two compilations of the
    same computation may differ there."""

    def meaning(node):
        if not isinstance(node, eqtrace.LowRankRTRLTrace):
            return node
        u, v = node.state_factors, node.param_factors
        leaves = [leaf for leaf in jtu.tree_leaves(node.base) if leaf.size]
        scale = max((float(jnp.max(jnp.abs(leaf))) for leaf in leaves), default=0.0)
        return node.base, jnp.einsum("...hr,...pr->...hp", u, v) + scale

    is_trace = lambda node: isinstance(node, eqtrace.LowRankRTRLTrace)  # noqa: E731
    return jtu.tree_map(meaning, tree, is_leaf=is_trace)


def relative_error(x: Any, y: Any) -> float:
    """Largest leaf-wise `max|x - y| / max|y|` (zero leaves of `y` compare absolutely; PRNG
    keys by their data; LowRankRTRL's traces by their base and correction,
    `low_rank_products`)."""
    x, y = key_data(low_rank_products(x)), key_data(low_rank_products(y))
    errors = [
        float(np.max(np.abs(np.asarray(a) - b)) / np.maximum(np.max(np.abs(b)), 1e-300))
        if b.size
        else 0.0
        for a, b in ((a, np.asarray(b)) for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y)))
    ]
    return max(errors)


def squared_loss(y, target):
    return jnp.sum((y - target) ** 2)


def mse(y, target):
    return jnp.mean((y - target) ** 2)


def online_only(algorithm, model, xs, targets, state=None):
    """The summed per-step online gradient alone (through the trace path), without BPTT's."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = model.init_state() if state is None else state
    plan = eqtrace.prepare(algorithm, model, xs[0])
    trace = algorithm.init_trace(model, state, plan=plan)
    step = eqtrace.make_online_step(algorithm, static, plan=plan)
    return eqtrace.online_gradient(
        step, squared_loss, params, state, trace, xs, targets, reduction="sum"
    )[1]


def online_and_bptt(algorithm, model, xs, targets, loss_fn=squared_loss, state=None, trace=None):
    """Summed per-step online gradients (through the trace path) and the BPTT gradient."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    if state is None:
        state = model.init_state()
    plan = eqtrace.prepare(algorithm, model, xs[0])  # once, for the trace and the step
    if trace is None:
        trace = algorithm.init_trace(model, state, plan=plan)
    online_step = eqtrace.make_online_step(algorithm, static, plan=plan)
    _, online, _, _ = eqtrace.online_gradient(
        online_step, loss_fn, params, state, trace, xs, targets, reduction="sum"
    )
    _, bptt, _ = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(static), loss_fn, params, state, xs, targets, reduction="sum"
    )
    return online, bptt


def online_in_blocks(algorithm, model, xs, targets, block_size, state=None):
    """`online_gradient`'s `(loss, grads, state, trace)` through the rule's block path, from
    `state` (default: the model's initial state) and a fresh trace, squared loss."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    if state is None:
        state = model.init_state()
    plan = eqtrace.prepare(algorithm, model, xs[0])
    return eqtrace.online_gradient(
        eqtrace.make_online_block(algorithm, static, plan=plan),
        squared_loss,
        params,
        state,
        algorithm.init_trace(model, state, plan=plan),
        xs,
        targets,
        block_size=block_size,
        reduction="sum",
    )


def output_shape(model, x) -> tuple[int, ...]:
    state = model.init_state()
    _, y = jax.eval_shape(model, state, x)
    return y.shape


# Random data from NumPy (a `np.random.Generator`, e.g. the `rng` fixture): `jr.normal` would
# compile once per shape, a large share of a test's run time at these sizes.


def normal(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape))


def unstack(a):
    """The slices along the leading axis, without an `unstack` compilation per shape."""
    return [jnp.asarray(row) for row in np.asarray(a)]


def random_sequence(rng, model, length: int, input_size: int, batch: tuple[int, ...] = ()):
    """Inputs `(length, *batch, input_size)` and targets shaped like the model's outputs."""
    xs = normal(rng, (length, *batch, input_size))
    targets = normal(rng, (length, *batch, *output_shape(model, jnp.zeros(input_size))))
    return xs, targets


def random_state(rng, model):
    """A generic non-zero state, so that no test passes because the state is zero."""
    return jtu.tree_map(lambda leaf: normal(rng, leaf.shape, 0.5), model.init_state())


def cast(model, dtype):
    """`model` with its floating-point arrays cast to `dtype`."""
    return jtu.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)


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


class TokenCell(eqtrace.AbstractCell):
    """An embedding and a masked recurrent op: `h' = leak ⊙ h + tanh(E[token] + W_mask h)`."""

    embed: eqx.nn.Embedding
    recurrent: nn.Linear
    leak: float = eqx.field(static=True)

    def __init__(self, vocabulary: int = 5, hidden_size: int = 4, *, leak: float = 0.0, key):
        k1, k2 = jr.split(key)
        self.embed = eqx.nn.Embedding(vocabulary, hidden_size, key=k1)
        mask = jnp.array(np.random.default_rng(0).random((hidden_size, hidden_size)) < 0.5)
        self.recurrent = nn.Linear(hidden_size, hidden_size, mask=mask, key=k2)
        self.leak = leak

    def init_state(self):
        return jnp.zeros(self.recurrent.out_features)

    def __call__(self, state, token):
        h = self.leak * state + jnp.tanh(self.embed(token) + self.recurrent(state))
        return h, h


class Rolling(eqtrace.AbstractCell):
    """Mixes neurons outside any synaptic op, breaking the diagonal assumption (and declares
    no `input_size`)."""

    op: eqx.nn.Linear
    hidden_size: int = eqx.field(static=True)

    def __init__(self, input_size, hidden_size, *, key):
        self.op = eqx.nn.Linear(input_size, hidden_size, key=key)
        self.hidden_size = hidden_size

    def init_state(self):
        return jnp.zeros(self.hidden_size)

    def __call__(self, state, x):
        h = jnp.tanh(0.5 * jnp.roll(state, 1) + self.op(x))
        return h, h


class ConvCell(eqtrace.AbstractCell):
    """A convolution (weights shared across positions) on a `(3, 6)` state of `(2, 6)` inputs."""

    conv: eqx.nn.Conv1d

    def __init__(self, *, key):
        self.conv = eqx.nn.Conv1d(2, 3, kernel_size=3, padding=1, key=key)

    def init_state(self):
        return jnp.zeros((3, 6))

    def __call__(self, state, x):
        h = 0.5 * state + jnp.tanh(self.conv(x))
        return h, h
