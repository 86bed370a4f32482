"""The weight-trace rules' gradient summed over a batch sample by sample (`_batch_sum`): the
same gradients as the batched product it replaces, per-sample gradients still per sample,
and no transposed copy of the trace in the compiled step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import eqtrace
from eqtrace import _batch_sum
from helpers import relative_error


BATCH = 3


def _problem(key):
    model = eqtrace.nn.Sequential(
        [eqtrace.nn.GRUCell(2, 5, key=key), eqtrace.nn.Linear(5, 2, key=jr.fold_in(key, 1))]
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return model, params, static


def _step_and_data(algorithm, key):
    model, params, static = _problem(key)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, BATCH)
    step = eqtrace.make_online_step(algorithm, static)
    xs = jr.normal(jr.fold_in(key, 2), (BATCH, 2))
    # A trace that is not zero: one step first.
    state, trace, _ = jax.vmap(step, in_axes=(None, 0, 0, 0))(params, state, trace, xs)
    return step, params, state, trace, xs


def _batch_gradient(step, params, state, trace, xs):
    def loss(params):
        _, _, y = jax.vmap(step, in_axes=(None, 0, 0, 0))(params, state, trace, xs)
        return jnp.sum(jnp.sin(y))

    return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize(
    "algorithm",
    [pytest.param(eqtrace.DRTRL(), id="drtrl"), pytest.param(eqtrace.SnAp1(), id="snap1")],
)
def test_unrolled_sum_equals_batched_product(algorithm, getkey, monkeypatch):
    args = _step_and_data(algorithm, getkey())
    unrolled = _batch_gradient(*args)
    monkeypatch.setattr(_batch_sum, "UNROLLED_BATCH", 0)
    batched = _batch_gradient(*args)
    assert relative_error(unrolled, batched) <= 1e-12
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(unrolled))


def test_per_sample_gradients_stay_per_sample(getkey):
    step, params, state, trace, xs = _step_and_data(eqtrace.DRTRL(), getkey())

    def loss(params, state, trace, x):
        return jnp.sum(jnp.sin(step(params, state, trace, x)[2]))

    per_sample = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0)))(
        params, state, trace, xs
    )
    for b in range(BATCH):
        one = jax.tree.map(lambda a, b=b: a[b], (state, trace, xs))
        expected = jax.grad(loss)(params, *one)
        assert relative_error(jax.tree.map(lambda g, b=b: g[b], per_sample), expected) <= 1e-12


def test_no_transposed_copy_of_the_trace(getkey):
    """The batched gradient reads the trace where it lies: no `dot` with batch dimensions
    (which needs the trace copied to `(out, batch, in)`) and no temporary of the trace's
    size."""
    step, params, state, trace, xs = _step_and_data(eqtrace.DRTRL(), getkey())

    def loss(params):
        _, _, y = jax.vmap(step, in_axes=(None, 0, 0, 0))(params, state, trace, xs)
        return jnp.sum(jnp.sin(y))

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    text = compiled.as_text()
    assert "lhs_batch_dims" not in text
    weight = trace[0].ops[1].weight  # the recurrent op's trace, (B, 15, 5, 1)
    assert compiled.memory_analysis().temp_size_in_bytes < weight.size * weight.dtype.itemsize
