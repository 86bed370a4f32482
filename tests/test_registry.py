"""The test registries (`registry.py`) are complete and their flags are true: every public
algorithm and cell class is registered, and each cell has the properties the oracle tests
select it by."""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqtrace
from eqtrace import nn
from helpers import LONG, pairs
from registry import (
    ALGORITHMS,
    CELLS,
    EVERY_CELL,
    PARAMETER_FREE_CELLS,
    SPECIALISED,
    WRAPPERS,
    make_cell,
)


def _public_classes(namespace, base):
    return {
        cls
        for cls in vars(namespace).values()
        if inspect.isclass(cls) and issubclass(cls, base) and not inspect.isabstract(cls)
    }


def test_every_algorithm_is_registered():
    cases = (*ALGORITHMS, *SPECIALISED)
    registered = {type(case.algorithm) for case in cases} | set(WRAPPERS)
    public = _public_classes(eqtrace, eqtrace.AbstractAlgorithm) - {eqtrace.AbstractAlgorithm}
    assert public <= registered, f"not in registry.ALGORITHMS: {public - registered}"
    assert len({case.name for case in cases}) == len(cases)
    # A specialised rule names the cells it accepts and the rule it equals on them, if any.
    names = {case.name for case in ALGORITHMS}
    for case in SPECIALISED:
        assert case.cells and set(case.cells) <= set(CELLS)
        assert case.same_as is None or case.same_as in names
    assert not any(case.cells for case in ALGORITHMS)


def test_every_cell_class_is_registered():
    public = _public_classes(nn, eqtrace.AbstractCell) - {nn.Sequential}
    every_cell = {type(eqx.filter_eval_shape(make_cell, name, jr.key(0))) for name in EVERY_CELL}
    registered = every_cell | set(PARAMETER_FREE_CELLS)
    assert public <= registered, f"not in registry.EVERY_CELL: {public - registered}"
    assert set(EVERY_CELL) <= set(CELLS)
    # The exemption holds only for cells that really have nothing to learn.
    for cls, make in PARAMETER_FREE_CELLS.items():
        assert type(make()) is cls
        assert not jax.tree.leaves(eqx.filter(make(), eqx.is_inexact_array))


@pytest.mark.parametrize(
    "case", [*ALGORITHMS, *SPECIALISED], ids=[case.name for case in (*ALGORITHMS, *SPECIALISED)]
)
def test_algorithm_flags_are_consistent(case):
    if case.exact:  # the stronger oracle implies the weaker ones
        assert case.exact_elementwise and case.equals_rtrl_at_first_step
        assert not case.statistical
    # The options the tests pass.
    assert case.make(check_finite=True).check_finite
    if case.needs_structure:
        assert not case.make(strict=False).strict


@eqx.filter_jit
def _output_and_jacobian(cell, state, x):
    return cell(state, x)[1], jax.jacfwd(lambda s: cell(s, x)[0])(state)


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_properties(name):
    case = CELLS[name]
    cell = make_cell(name, jr.key(0))
    hidden = 4
    state = cell.init_state()
    leaves = jax.tree.leaves(state)
    assert len(leaves) == case.state_leaves
    assert all(leaf.shape == (hidden,) for leaf in leaves)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.0, 1.0, a.shape), a.dtype), state)
    if case.inputs == "tokens":
        x = jnp.asarray(2)
    else:
        x = jnp.asarray(3 * rng.standard_normal(3))
    y, jacobian = _output_and_jacobian(cell, state, x)
    if case.spiking:
        assert set(np.unique(np.asarray(y))) <= {0.0, 1.0}
    else:
        assert not set(np.unique(np.asarray(y))) <= {0.0, 1.0}
    # Element-wise recurrence: the Jacobian of the new state in the old one couples each
    # neuron to itself only (across leaves, not across neurons).
    off_diagonal = [
        float(np.max(np.abs(np.asarray(block) * (1 - np.eye(hidden)))))
        for block in jax.tree.leaves(jacobian)
    ]
    assert (max(off_diagonal) == 0) == case.elementwise, off_diagonal


def test_pairs_cover_every_entry():
    """The default pairing of a product keeps each entry of both lists (the oracles stay on
    every rule and every cell); `LONG` restores every pair."""
    rules = [pytest.param("r0", id="first"), "r1", "r2"]
    params = pairs(rules, [1, 2, 3, 4, 5])
    assert {p.values[0] for p in params} == {"r0", "r1", "r2"}
    assert {p.values[1] for p in params} == {1, 2, 3, 4, 5}
    assert len(params) == (15 if LONG else 5)
    assert len({p.values for p in params}) == len(params)
    assert params[0].id == "first-1"
