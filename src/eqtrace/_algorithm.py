import abc
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._cell import AbstractCell
from ._custom_types import ExampleInput, Input, State, Trace
from ._structure import concrete
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

    `steps(model, state, trace, xs)` does the same for a block of steps at once.

    Subclasses implement the three methods that act on one recurrent system (a cell, or for
    algorithms with `per_layer = False` a whole network's recurrent core), and may override
    `cell_steps` to compute a block of steps faster than one step at a time.
    """

    #: Whether a `Sequential` gets one trace per cell (diagonal rules) or one for the whole
    #: recurrent core (exact RTRL).
    per_layer: ClassVar[bool]

    @abc.abstractmethod
    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> Trace:
        """The initial (zero) trace of one recurrent system for one sample; `x` is an example
        input (only its shape and dtype matter)."""

    @abc.abstractmethod
    def update(
        self, cell: AbstractCell, state: State, trace: Trace, x: Input
    ) -> tuple[State, Trace]:
        """One step of the system and of its trace, `(h_{t-1}, ε_{t-1}) -> (h_t, ε_t)`."""

    @abc.abstractmethod
    def parameter_tangent(
        self, cell: AbstractCell, state: State, x: Input, trace: Trace, params_tangent: Any
    ) -> State:
        """The trace applied to a tangent of the cell's parameters, `Σ ε_t · δθ`: the change
        of `h_t` that the rule attributes to `δθ`. It must be linear in `params_tangent` (a
        pytree shaped like `eqx.filter(cell, eqx.is_inexact_array)`); its transpose, which JAX
        derives, contracts the trace with `ḡ = dL/dh_t` to give the online gradient. `state`
        and `x` are the step's inputs."""

    def cell_steps(
        self, cell: AbstractCell, state: State, trace: Trace, xs: Input
    ) -> tuple[State, Trace]:
        """Steps of one recurrent system over the leading (time) axis of `xs`.

        **Returns:** the new states `h_1 … h_T`, stacked along a leading axis, and the last
        trace; with the same values and derivatives as `T` single steps. This default keeps
        every step's trace for the derivatives, so its memory is `T` times the trace;
        algorithms with large traces override it.
        """
        params, static = eqx.partition(cell, eqx.is_inexact_array)
        frozen = eqx.combine(jax.lax.stop_gradient(params), static)

        def body(carry, x):
            new_state, new_trace = self.update(frozen, carry[0], carry[1], x)
            return (new_state, new_trace), (carry[0], new_state, new_trace)

        carry = jax.lax.stop_gradient((state, trace))
        _, (previous, states, traces) = jax.lax.scan(body, carry, jax.lax.stop_gradient(xs))
        if getattr(self, "check_finite", False):
            states, traces = error_if_not_finite(self, (states, traces))

        def link(x, state, trace):
            return _link(params, x, algorithm=self, static=static, state=state, trace=trace)

        # The links of all steps at once: their transpose contracts the traces with the
        # cotangents of all steps in one product.
        links = jax.vmap(link)(xs, previous, traces)
        return jtu.tree_map(jnp.add, states, links), _last(traces)

    def init_trace(self, model: AbstractCell, state: State, x: ExampleInput | None = None) -> Trace:
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
                        s, x = concrete(eqx.filter_eval_shape(layer, s, x))
                    else:
                        traces.append(None)
                        x = concrete(eqx.filter_eval_shape(layer, x))
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
        self._check_arguments(model, state, trace, x)
        if isinstance(model, Sequential):
            if self.per_layer:
                new_state, new_trace = [], []
                for layer, s, tr in zip(model.layers, state, trace):
                    if isinstance(layer, AbstractCell):
                        s, tr = online_transition(self, layer, s, tr, x)
                        x = layer.output(s)
                    else:
                        x = layer(x)
                    new_state.append(s)
                    new_trace.append(tr)
                return tuple(new_state), tuple(new_trace), x
            core = model.core
            core_state, trace = online_transition(self, core, state[: len(core.layers)], trace, x)
            new_state = core_state + state[len(core.layers) :]
            return new_state, trace, model.output(new_state)
        new_state, trace = online_transition(self, model, state, trace, x)
        return new_state, trace, model.output(new_state)

    def steps(
        self, model: AbstractCell, state: State, trace: Trace, xs: Input
    ) -> tuple[State, Trace, Any]:
        """Advances `model` over the leading (time) axis of `xs`: a block of `T` steps.

        The values and the derivatives are those of `T` calls of `step` — `jax.grad` of
        `Σ_t L(y_t)` is the sum of the `T` online gradients — but an algorithm may compute them
        in fewer passes over the trace (`DRTRL` passes once per block instead of once per step).

        **Arguments:** as for `step`, with `xs` holding `T` inputs of one sample along a leading
        axis.

        **Returns:** `(state, trace, ys)`: the last state and trace, and the `T` outputs stacked.
        """
        self._check_arguments(model, state, trace, jtu.tree_map(lambda a: a[0], xs))
        if isinstance(model, Sequential):
            if self.per_layer:
                new_state, new_trace = [], []
                for layer, s, tr in zip(model.layers, state, trace):
                    if isinstance(layer, AbstractCell):
                        states, tr = self.cell_steps(layer, s, tr, xs)
                        s, xs = _last(states), jax.vmap(layer.output)(states)
                    else:
                        xs = jax.vmap(layer)(xs)
                    new_state.append(s)
                    new_trace.append(tr)
                return tuple(new_state), tuple(new_trace), xs
            core = model.core
            rest = state[len(core.layers) :]
            states, trace = self.cell_steps(core, state[: len(core.layers)], trace, xs)
            ys = jax.vmap(lambda s: model.output(s + rest))(states)
            return _last(states) + rest, trace, ys
        states, trace = self.cell_steps(model, state, trace, xs)
        return _last(states), trace, jax.vmap(model.output)(states)

    def _check_arguments(self, model, state, trace, x) -> None:
        check_state(model, state)
        check_input(model, x)
        check_matches(
            "trace",
            eqx.filter_eval_shape(self.init_trace, model, state, x),
            trace,
            f"Create it with `{type(self).__name__}(...).init_trace(model, state)` for this "
            "model; a trace made by another algorithm or for another model cannot be reused.",
        )


def _last(stacked: Any) -> Any:
    return jtu.tree_map(lambda a: a[-1], stacked)


def online_transition(algorithm: AbstractAlgorithm, cell: AbstractCell, state, trace, x):
    """`(h_t, ε_t)` from `(h_{t-1}, ε_{t-1}, x_t)`, differentiable as the online rule says.

    Derivatives of the returned state are: exact with respect to `x` (within-step credit to
    earlier layers); the algorithm's trace with respect to the cell's parameters; zero with
    respect to the old state and trace (no backpropagation through time).

    The parameter path is a zero-valued term whose JVP is the trace applied to a parameter
    tangent (`_link`); reverse mode transposes it into the trace contracted with
    `ḡ = dL/dh_t`. (DESIGN.md §2 suggests a `custom_vjp` on the whole step; expressing the rule
    as a linear JVP instead lets `jax.vmap` turn the gradient of shared parameters into one
    batch-contracted product rather than per-sample gradients summed afterwards, costs nothing
    in the forward pass, and makes forward-mode differentiation of a step work too.)
    """
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    frozen = eqx.combine(jax.lax.stop_gradient(params), static)
    state, trace = jax.lax.stop_gradient((state, trace))
    new_state, new_trace = algorithm.update(frozen, state, trace, jax.lax.stop_gradient(x))
    if getattr(algorithm, "check_finite", False):
        new_state, new_trace = error_if_not_finite(algorithm, (new_state, new_trace))
    link = _link(params, x, algorithm=algorithm, static=static, state=state, trace=new_trace)
    return jtu.tree_map(jnp.add, new_state, link), new_trace


@eqx.filter_custom_jvp
def _link(params, x, *, algorithm, static, state, trace):
    """Zero in value. Its JVP is the step's derivative as the online rule defines it: the trace
    applied to the parameters' tangent, plus the exact `∂h_t/∂x` applied to the input's."""
    del params, x, algorithm, static, trace
    return zeros_like_batched(state)


@_link.def_jvp
def _link_jvp(primals, tangents, *, algorithm, static, state, trace):
    params, x = primals
    params_tangent, x_tangent = tangents
    zeros = zeros_like_batched(state)
    cell = eqx.combine(params, static)
    tangent = zeros
    if has_tangent(params_tangent):
        tangent = algorithm.parameter_tangent(
            cell, state, x, trace, fill_tangent(params, params_tangent)
        )
    if has_tangent(x_tangent):
        # Only computed when the input is differentiated: a first layer pays nothing for it.
        tangent = jtu.tree_map(jnp.add, tangent, input_tangent(cell, state, x, x_tangent))
    return zeros, tangent


def zeros_like_batched(tree: Any) -> Any:
    """Zeros shaped like `tree`, computed *from* it, for the value of a link.

    `jnp.zeros_like` would be a constant: under `jax.vmap` the link's value is then unbatched
    while its tangent is batched, and `jax.grad` of `jax.jit(jax.vmap(step))` fails inside JAX
    (`broadcast_in_dim broadcast_dimensions must have length equal to operand ndim`, JAX
    0.10). A `where` on the tree keeps the value batched like the tree; XLA folds it away."""
    return jtu.tree_map(lambda a: jnp.where(True, jnp.zeros((), a.dtype), a), tree)


def input_tangent(cell: AbstractCell, state: State, x: Input, x_tangent: Any) -> State:
    """The exact within-step `∂h_t/∂x_t · δx`: the credit to the input, and so to the layers
    below, that every online rule passes on unchanged."""
    diff_x, static_x = eqx.partition(x, eqx.is_inexact_array)
    _, from_x = jax.jvp(
        lambda dx: cell(state, eqx.combine(dx, static_x))[0],
        (diff_x,),
        (fill_tangent(diff_x, x_tangent),),
    )
    return from_x


def has_tangent(tangent: Any) -> bool:
    """Whether a custom-JVP tangent holds anything but symbolic zeros (`None`)."""
    return any(t is not None for t in jtu.tree_leaves(tangent, is_leaf=_is_none))


def fill_tangent(primal: Any, tangent: Any) -> Any:
    """A custom-JVP tangent with its symbolic zeros (`None`) made explicit."""
    return jtu.tree_map(lambda p, t: jnp.zeros_like(p) if t is None else t, primal, tangent)


def error_if_not_finite(algorithm: AbstractAlgorithm, tree: Any) -> Any:
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))
    return eqx.error_if(
        tree,
        jnp.logical_not(finite),
        f"{type(algorithm).__name__}: the state or trace became non-finite (NaN or inf). Check "
        "the input and the learning rate, or lower the trace decay.",
    )


def _is_none(x) -> bool:
    return x is None
