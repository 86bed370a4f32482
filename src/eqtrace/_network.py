"""Networks: how a rule's per-system methods run a cell or a `Sequential`, written once for
the initial trace, a step and a block of steps.

Rules with `per_layer = True` (the diagonal rules) give each cell of a `Sequential` its own
trace and run stateless layers (and cells without parameters, which need no trace) exactly
within each step; rules with `per_layer = False` (exact RTRL) treat the
network's recurrent core (its layers up to the last cell) as one system and the layers after
it as an exact read-out. The rule itself only ever sees one system; a per-layer rule may
configure itself for each cell from the layer that reads its output (`for_layer`, called once
by `eqtrace.prepare`: the steps run the rules the plan holds), and may define the derivative of
a cell's output itself (`cell_output_tangent`).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._cell import AbstractCell, has_parameters
from ._link import OutputDerivative, StepDerivative, freeze, last, link
from ._probing import concrete
from ._sequential import Sequential
from ._validation import (
    check_example_input,
    check_input,
    check_matches,
    check_model,
    check_parameters_enter_step,
    check_state,
    check_step_keeps_state,
)


def _identity(x: Any) -> Any:
    return x


def _transition(algorithm, cell, state, trace, x):
    """One online step of one system, `(h_t, ε_t, y_t)`, differentiable as the rule says:
    exactly with respect to `x` (within-step credit to earlier layers), through the rule's
    trace with respect to the cell's parameters, and not at all with respect to the old state
    and trace (no backpropagation through time)."""
    params, static, frozen, (state, trace, stopped_x) = freeze(cell, state, trace, x)
    new_state, new_trace = algorithm.cell_step(frozen, state, trace, stopped_x)
    new_state, new_trace = algorithm.checked(new_state, new_trace)
    derivative = StepDerivative(algorithm=algorithm, state=state, trace=new_trace)
    link_value = link(params, x, static=static, derivative=derivative)
    linked = jtu.tree_map(jnp.add, new_state, link_value)
    if not algorithm.defines_output_tangent:
        return linked, new_trace, cell.output(linked)
    # The rule differentiates the output itself (e.g. e-prop's filtered traces): its own link,
    # on the output's value.
    y = frozen.output(new_state)
    derivative = OutputDerivative(algorithm=algorithm, state=state, trace=new_trace, output=y)
    y_link = link(params, x, static=static, derivative=derivative)
    return linked, new_trace, jtu.tree_map(jnp.add, y, y_link)


def _fixed_step(algorithm, cell, state, x):
    """One step of a cell without parameters, `(h_t, y_t)`: differentiable exactly with
    respect to `x` (credit to earlier layers within the step) and, as every cell under a
    per-layer rule, not with respect to the old state."""
    del algorithm
    new_state, _ = cell(jax.lax.stop_gradient(state), x)
    return new_state, cell.output(new_state)


def _fixed_block(algorithm, cell, state, xs):
    """A cell without parameters over a block of steps, `(states, ys)` with time leading:
    `_fixed_step` at each step, or, if the rule differentiates its blocks exactly (exact
    windows), through the states within the block."""
    through_states = algorithm.exact_within_blocks

    def body(s, x):
        new_state, _ = cell(s if through_states else jax.lax.stop_gradient(s), x)
        return new_state, (new_state, cell.output(new_state))

    _, (states, ys) = jax.lax.scan(body, jax.lax.stop_gradient(state), xs)
    return states, ys


def scan_transitions(algorithm, cell, state, trace, xs):
    """`(states, trace, ys)` of a block of steps, each an online step with its own output link
    (`_transition`), scanned: the states and outputs stacked, the last trace."""

    def body(carry, x):
        new_state, new_trace, y = _transition(algorithm, cell, *carry, x)
        return (new_state, new_trace), (new_state, y)

    (_, trace), (states, ys) = jax.lax.scan(body, (state, trace), xs)
    return states, trace, ys


def _block(algorithm, cell, state, trace, xs):
    if algorithm.defines_output_tangent:
        # The rule differentiates the outputs itself: its block of outputs (by default a scan
        # of the steps, as each step's output link needs that step's trace).
        return algorithm.cell_output_steps(cell, state, trace, xs)
    states, trace = algorithm.cell_steps(cell, state, trace, xs)
    return states, trace, jax.vmap(cell.output)(states)


class Mode(NamedTuple):
    """How one call advances a system: by one step, or by a block of steps (time leading)."""

    #: `(algorithm, cell, state, trace, x) -> (new state(s), trace, output(s))`.
    advance: Callable
    #: The last state from what `advance` returned.
    final: Callable
    #: Maps a per-step function over the step(s): the identity, or `jax.vmap`.
    each: Callable
    #: The input of the first step, for the argument checks.
    first: Callable
    #: `(algorithm, cell, state, x) -> (new state(s), output(s))` of a cell without
    #: parameters.
    fixed: Callable


STEP = Mode(
    advance=_transition, final=_identity, each=_identity, first=_identity, fixed=_fixed_step
)
BLOCK = Mode(
    advance=_block,
    final=last,
    each=jax.vmap,
    first=lambda xs: jtu.tree_map(lambda a: a[0], xs),
    fixed=_fixed_block,
)


def advance_network(algorithm, model: AbstractCell, state, trace, x, mode: Mode, plan=None):
    """`(state, trace, y)` of `model` after one call in `mode`, with `y` its output (stacked
    over the block's steps for `BLOCK`), each cell run by the rule `plan` holds for it
    (prepared here if not given)."""
    plan = _check_arguments(algorithm, model, state, trace, mode.first(x), plan)
    if not isinstance(model, Sequential):
        if not has_parameters(model):
            states, ys = mode.fixed(algorithm, model, state, x)
            return mode.final(states), trace, ys
        states, trace, ys = mode.advance(plan.layers[0].rule, model, state, trace, x)
        return mode.final(states), trace, ys
    if not algorithm.per_layer:
        num_core = len(model.core.layers)
        rest = state[num_core:]
        states, trace, _ = mode.advance(algorithm, model.core, state[:num_core], trace, x)
        ys = mode.each(lambda s: model.output(s + rest))(states)
        return mode.final(states) + rest, trace, ys
    new_state, new_trace = [], []
    for i, (layer, s, tr) in enumerate(zip(model.layers, state, trace)):
        if isinstance(layer, AbstractCell) and not has_parameters(layer):
            states, x = mode.fixed(algorithm, layer, s, x)
            s = mode.final(states)
        elif isinstance(layer, AbstractCell):
            states, tr, x = mode.advance(plan.layers[i].rule, layer, s, tr, x)
            s = mode.final(states)
        else:
            x = mode.each(layer)(x)
        new_state.append(s)
        new_trace.append(tr)
    return tuple(new_state), tuple(new_trace), x


def init_network_trace(algorithm, model: AbstractCell, state, x=None, plan=None):
    """The initial trace of `model` for one sample (see `AbstractAlgorithm.init_trace`), laid
    out as `plan` says (prepared here if not given)."""
    from ._plan import check_plan, prepare  # `_plan` reads the rules, which import this.

    check_model(f"{type(algorithm).__name__}.init_trace", "model", model)
    check_state(model, state)
    if x is not None:  # An example input of the wrong shape would fail deep inside the model.
        check_example_input(model, state, x)
    if plan is None:
        plan = prepare(algorithm, model, x)
    check_plan(f"{type(algorithm).__name__}.init_trace", plan, algorithm, model)
    if not isinstance(model, Sequential):
        (layer,) = plan.layers
        return _init_layer(layer, model, state)
    if not algorithm.per_layer:
        core = model.core
        first = concrete(plan.layers[0].input)
        return algorithm.init_cell_trace(core, state[: len(core.layers)], first)
    return tuple(
        _init_layer(lp, layer, s) for lp, layer, s in zip(plan.layers, model.layers, state)
    )


def _init_layer(layer_plan, layer, state):
    """The initial trace of one layer as its plan says: its rule's, or `None`."""
    if layer_plan.rule is None:
        return None
    return layer_plan.rule.init_cell_trace(layer, state, concrete(layer_plan.input))


def _check_arguments(algorithm, model, state, trace, x, plan):
    """Checks the arguments of a step; returns the plan of `algorithm` for `model` (`plan`, or
    prepared here), whose trace layout `trace` must have and whose rules run the layers."""
    from ._plan import check_plan, prepare, traced_note

    check_state(model, state)
    check_input(model, x)
    check_step_keeps_state(model, state, x)
    check_parameters_enter_step(model, state, x)
    # A plan prepared here, inside a trace, cannot read traced masks or index tables, so its
    # trace layout may differ from that of the plan `init_trace` prepared outside (SnAp-n's
    # pattern of a masked cell under `eqx.filter_jit(rule.step)`): say so, and the fix.
    note = traced_note(model) if plan is None else ""
    if plan is None:
        plan = prepare(algorithm, model, x)
    check_plan(f"{type(algorithm).__name__}.step", plan, algorithm, model)
    check_matches(
        "trace",
        plan.trace,
        trace,
        note
        + f"Create it with `{type(algorithm).__name__}(...).init_trace(model, state)` for this "
        "model; a trace made by another algorithm or for another model cannot be reused.",
    )
    return plan
