"""Networks: how a rule's per-system methods run a cell or a `Sequential`, written once for
the initial trace, a step and a block of steps.

Rules with `per_layer = True` (the diagonal rules) give each cell of a `Sequential` its own
trace and run stateless layers exactly; rules with `per_layer = False` (exact RTRL) treat the
network's recurrent core (its layers up to the last cell) as one system and the layers after
it as an exact read-out. The rule itself only ever sees one system.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._cell import AbstractCell
from ._link import StepDerivative, freeze, last, link
from ._probing import concrete
from ._sequential import Sequential
from ._validation import (
    check_input,
    check_matches,
    check_state,
    example_input,
    require_example_input,
)


def _identity(x: Any) -> Any:
    return x


def _transition(algorithm, cell, state, trace, x):
    """One online step of one system, `(h_t, ε_t)`, differentiable as the rule says: exactly
    with respect to `x` (within-step credit to earlier layers), through the rule's trace with
    respect to the cell's parameters, and not at all with respect to the old state and trace
    (no backpropagation through time)."""
    params, static, frozen, (state, trace, stopped_x) = freeze(cell, state, trace, x)
    new_state, new_trace = algorithm.cell_step(frozen, state, trace, stopped_x)
    new_state, new_trace = algorithm.checked(new_state, new_trace)
    derivative = StepDerivative(algorithm=algorithm, state=state, trace=new_trace)
    link_value = link(params, x, static=static, derivative=derivative)
    return jtu.tree_map(jnp.add, new_state, link_value), new_trace


def _block(algorithm, cell, state, trace, xs):
    return algorithm.cell_steps(cell, state, trace, xs)


class Mode(NamedTuple):
    """How one call advances a system: by one step, or by a block of steps (time leading)."""

    #: `(algorithm, cell, state, trace, x) -> (new state(s), trace)`.
    advance: Callable
    #: The last state from what `advance` returned.
    final: Callable
    #: Maps a per-step function over the step(s): the identity, or `jax.vmap`.
    each: Callable
    #: The input of the first step, for the argument checks.
    first: Callable


STEP = Mode(advance=_transition, final=_identity, each=_identity, first=_identity)
BLOCK = Mode(
    advance=_block,
    final=last,
    each=jax.vmap,
    first=lambda xs: jtu.tree_map(lambda a: a[0], xs),
)


def advance_network(algorithm, model: AbstractCell, state, trace, x, mode: Mode):
    """`(state, trace, y)` of `model` after one call in `mode`, with `y` its output (stacked
    over the block's steps for `BLOCK`)."""
    _check_arguments(algorithm, model, state, trace, mode.first(x))
    if not isinstance(model, Sequential):
        states, trace = mode.advance(algorithm, model, state, trace, x)
        return mode.final(states), trace, mode.each(model.output)(states)
    if not algorithm.per_layer:
        num_core = len(model.core.layers)
        rest = state[num_core:]
        states, trace = mode.advance(algorithm, model.core, state[:num_core], trace, x)
        ys = mode.each(lambda s: model.output(s + rest))(states)
        return mode.final(states) + rest, trace, ys
    new_state, new_trace = [], []
    for layer, s, tr in zip(model.layers, state, trace):
        if isinstance(layer, AbstractCell):
            states, tr = mode.advance(algorithm, layer, s, tr, x)
            s, x = mode.final(states), mode.each(layer.output)(states)
        else:
            x = mode.each(layer)(x)
        new_state.append(s)
        new_trace.append(tr)
    return tuple(new_state), tuple(new_trace), x


def init_network_trace(algorithm, model: AbstractCell, state, x=None):
    """The initial trace of `model` for one sample (see `AbstractAlgorithm.init_trace`)."""
    check_state(model, state)
    x = example_input(model) if x is None else x
    if not isinstance(model, Sequential):
        return algorithm.init_cell_trace(model, state, x)
    if not algorithm.per_layer:
        core = model.core
        return algorithm.init_cell_trace(core, state[: len(core.layers)], x)
    traces = []
    for layer, s in zip(model.layers, state):
        require_example_input(model, x)
        if isinstance(layer, AbstractCell):
            traces.append(algorithm.init_cell_trace(layer, s, x))
            s, x = concrete(eqx.filter_eval_shape(layer, s, x))
        else:
            traces.append(None)
            x = concrete(eqx.filter_eval_shape(layer, x))
    return tuple(traces)


def _check_arguments(algorithm, model, state, trace, x) -> None:
    check_state(model, state)
    check_input(model, x)
    check_matches(
        "trace",
        eqx.filter_eval_shape(init_network_trace, algorithm, model, state, x),
        trace,
        f"Create it with `{type(algorithm).__name__}(...).init_trace(model, state)` for this "
        "model; a trace made by another algorithm or for another model cannot be reused.",
    )
