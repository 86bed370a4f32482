import abc
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._cell import AbstractCell
from ._custom_types import Input, State, Trace
from ._validation import (
    check_input,
    check_matches,
    check_state,
    example_input,
    require_example_input,
)
from .nn._sequential import Sequential


class AbstractAlgorithm(eqx.Module):
    """An online gradient estimator: hyperparameters only; what changes over time is the trace.

    `step(model, state, trace, x) -> (state, trace, y)` advances the model by one step and
    updates the eligibility trace. Its vector-Jacobian product *is* the online rule: `jax.grad`
    of a loss on `y` (or on the returned state) gives

    - for the model's parameters, the trace contracted with `ḡ = dL/dh_t`;
    - for `x`, the exact within-step VJP `(∂h_t/∂x)ᵀ ḡ`, so layers below get exact spatial credit;
    - for the old state and the trace, zero: no backpropagation through time.

    Subclasses implement the three methods that act on one recurrent system (a cell, or for
    algorithms with `per_layer = False` a whole network's recurrent core).
    """

    #: Whether a `Sequential` gets one trace per cell (diagonal rules) or one for the whole
    #: recurrent core (exact RTRL).
    per_layer: ClassVar[bool]

    @abc.abstractmethod
    def init_cell_trace(self, cell: AbstractCell, state: State, x: Input) -> Trace:
        """The initial (zero) trace of one recurrent system for one sample; `x` is an example
        input (only its shape and dtype matter)."""

    @abc.abstractmethod
    def update(
        self, cell: AbstractCell, state: State, trace: Trace, x: Input
    ) -> tuple[State, Trace]:
        """One step of the system and of its trace, `(h_{t-1}, ε_{t-1}) -> (h_t, ε_t)`."""

    @abc.abstractmethod
    def parameter_gradient(
        self, cell: AbstractCell, state: State, x: Input, trace: Trace, state_cotangent: State
    ) -> Any:
        """The online gradient of the cell's parameters: the new trace `ε_t` contracted with
        `ḡ = dL/dh_t` (`state` and `x` are the step's inputs). Returns a pytree shaped like
        `eqx.filter(cell, eqx.is_inexact_array)`."""

    def init_trace(self, model: AbstractCell, state: State, x: Input | None = None) -> Trace:
        """The initial trace of `model` (a cell or a `Sequential`) for one sample.

        **Arguments:**

        - `model`: the cell or network.
        - `state`: its state for one sample, e.g. `model.init_state()`.
        - `x`: an example input of one step (only its shape and dtype are used). Needed only
          when the model does not declare an `input_size`.

        **Returns:** the trace pytree to pass to `step`.
        """
        check_state(model, state)
        x = example_input(model) if x is None else x
        if isinstance(model, Sequential):
            if self.per_layer:
                traces = []
                for layer, s in zip(model.layers, state):
                    require_example_input(model, x)
                    if isinstance(layer, AbstractCell):
                        traces.append(self.init_cell_trace(layer, s, x))
                        s, x = jax.eval_shape(layer, s, x)
                    else:
                        traces.append(None)
                        x = jax.eval_shape(layer, x)
                return tuple(traces)
            core = model.core
            return self.init_cell_trace(core, state[: len(core.layers)], x)
        return self.init_cell_trace(model, state, x)

    def step(
        self, model: AbstractCell, state: State, trace: Trace, x: Input
    ) -> tuple[State, Trace, Any]:
        """Advances `model` by one step and its trace by one update.

        **Arguments:**

        - `model`: the cell or `Sequential` network.
        - `state`: the previous state of one sample.
        - `trace`: the previous trace, from `init_trace` or an earlier `step`.
        - `x`: the input of this step for one sample.

        **Returns:** `(state, trace, y)`, with `y = model.output(state)` at the new state.
        """
        check_state(model, state)
        check_matches(
            "trace",
            jax.eval_shape(self.init_trace, model, state, x),
            trace,
            f"Create it with `{type(self).__name__}(...).init_trace(model, state)` for this "
            "model; a trace made by another algorithm or for another model cannot be reused.",
        )
        check_input(model, x)
        if isinstance(model, Sequential):
            if self.per_layer:
                new_state, new_trace = [], []
                for layer, s, tr in zip(model.layers, state, trace):
                    if isinstance(layer, AbstractCell):
                        s, tr = online_transition((layer, s, tr, x), self)
                        x = layer.output(s)
                    else:
                        x = layer(x)
                    new_state.append(s)
                    new_trace.append(tr)
                return tuple(new_state), tuple(new_trace), x
            core = model.core
            core_state, trace = online_transition(
                (core, state[: len(core.layers)], trace, x), self
            )
            new_state = core_state + state[len(core.layers) :]
            return new_state, trace, model.output(new_state)
        new_state, trace = online_transition((model, state, trace, x), self)
        return new_state, trace, model.output(new_state)


@eqx.filter_custom_vjp
def online_transition(inputs, algorithm):
    """`(h_t, ε_t)` from `(h_{t-1}, ε_{t-1}, x_t)`, differentiated by the algorithm's rule."""
    cell, state, trace, x = inputs
    return algorithm.update(cell, state, trace, x)


@online_transition.def_fwd
def _online_transition_fwd(perturbed, inputs, algorithm):
    del perturbed
    cell, state, trace, x = inputs
    new_state, new_trace = algorithm.update(cell, state, trace, x)
    return (new_state, new_trace), new_trace


@online_transition.def_bwd
def _online_transition_bwd(new_trace, cotangents, perturbed, inputs, algorithm):
    cell, state, trace, x = inputs
    cell_perturbed, _, _, x_perturbed = perturbed
    state_cotangent = _materialise_zeros(state, cotangents[0])
    cell_grad = _no_gradient(cell)
    if any(jtu.tree_leaves(cell_perturbed)):
        cell_grad = algorithm.parameter_gradient(cell, state, x, new_trace, state_cotangent)
    x_grad = _no_gradient(x)
    if any(jtu.tree_leaves(x_perturbed)):
        # Exact spatial credit within the step: the VJP of the transition with respect to x.
        _, vjp_x = eqx.filter_vjp(lambda x_: cell(state, x_)[0], x)
        (x_grad,) = vjp_x(state_cotangent)
    return cell_grad, _no_gradient(state), _no_gradient(trace), x_grad


def _materialise_zeros(like: Any, cotangent: Any) -> Any:
    """Replaces symbolic-zero (`None`) cotangents by arrays of zeros."""
    if cotangent is None:
        return jtu.tree_map(jnp.zeros_like, like)
    return jtu.tree_map(lambda s, c: jnp.zeros_like(s) if c is None else c, like, cotangent)


def _no_gradient(tree: Any) -> Any:
    """A symbolic-zero cotangent for `tree` (`None` in place of every array)."""
    return jtu.tree_map(lambda _: None, eqx.filter(tree, eqx.is_inexact_array))
