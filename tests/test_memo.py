"""The memo of the structural analyses (`eqtrace._memo`) reuses a result only where the
analysis would read the same thing: a cell with new weights, never one with another mask,
activation or size; it never carries a tracer of one `jit` into another."""

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from eqtrace import nn
from eqtrace._memo import _key, clear_structural_memos, structural_memo
from eqtrace._structure import analyse


def _lif(key, mask):
    return nn.LIF(3, 4, recurrent=True, recurrent_mask=mask, key=key)


def test_new_weights_reuse_the_analysis_and_a_new_mask_does_not(getkey):
    mask = np.ones((4, 4), bool)
    cell = _lif(getkey(), jnp.asarray(mask))
    x = jnp.zeros(3)
    first = analyse(cell, cell.init_state(), x)
    assert analyse(_lif(getkey(), jnp.asarray(mask)), cell.init_state(), x) is first
    banded = np.triu(np.tril(mask, 1), -1)  # another mask: its own structure
    other = _lif(getkey(), jnp.asarray(banded))
    assert analyse(other, other.init_state(), x) is not first
    # The memo changes no result: the same structure analysed afresh.
    clear_structural_memos()
    assert analyse(other, other.init_state(), x) == analyse.__wrapped__(
        other, other.init_state(), x
    )


class _Activation(eqx.Module):
    fn: Callable = eqx.field(static=True)
    weight: jax.Array


def test_the_key_holds_what_the_analysis_reads(getkey):
    gru = nn.GRUCell(3, 4, key=getkey())
    state, x = gru.init_state(), jnp.zeros(3)
    assert _key((gru, state, x)) == _key((nn.GRUCell(3, 4, key=getkey()), state, x))
    assert _key((gru, state, x)) != _key((nn.GRUCell(3, 5, key=getkey()), state, x))
    assert _key((gru, state, x)) != _key((gru, state, x.astype(jnp.float32)))
    tanh, relu = _Activation(jnp.tanh, jnp.ones(2)), _Activation(jax.nn.relu, jnp.ones(2))
    assert _key((tanh,)) == _key((_Activation(jnp.tanh, jnp.zeros(2)),))
    assert _key((tanh,)) != _key((relu,))
    assert _key((gru, state, jnp.zeros(3, int))) != _key((gru, state, jnp.ones(3, int)))


def test_unkeyable_arguments_skip_the_memo():
    calls = []

    @structural_memo(1)
    def analysis(tree):
        calls.append(tree)
        return len(calls)

    assert analysis({"a": [1]}) == analysis({"a": [1]}) - 1 + 1 == 1  # hashable: memoised
    key = jr.key(0)
    assert analysis(key) == 2 and analysis(key) == 3  # a PRNG key: analysed every time
    assert analysis(object()) == 4


@dataclasses.dataclass(frozen=True)
class _Result:
    value: jax.Array


def test_no_tracer_leaks_from_one_jit_into_another():
    @structural_memo(1)
    def analysis(x):
        return _Result(2 * x)  # inside `jit`, a tracer of that trace

    assert float(jax.jit(lambda x: analysis(x).value)(1.0)) == 2.0
    assert float(jax.jit(lambda x: analysis(x).value + 1)(1.0)) == 3.0  # not the first's tracer
    assert analysis(jnp.ones(())) is analysis(jnp.zeros(()))  # concrete results: memoised
