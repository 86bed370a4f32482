"""The contract every online rule implements."""

import abc
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox import AbstractClassVar, AbstractVar

from ._cell import AbstractCell
from ._custom_types import ExampleInput, Input, State
from ._link import StepDerivative, freeze, last, link, output_input_tangent
from ._network import BLOCK, STEP, advance_network, init_network_trace, scan_transitions


_Trace = TypeVar("_Trace")


class AbstractAlgorithm(eqx.Module, Generic[_Trace]):
    """An online gradient estimator: hyperparameters only; what changes over time is the trace.

    `step(model, state, trace, x) -> (state, trace, y)` advances the model by one step and
    updates the eligibility trace. Its vector-Jacobian product *is* the online rule: `jax.grad`
    of a loss on `y` (or on the returned state) gives

    - for the model's parameters, the trace contracted with `ḡ = dL/dh_t`;
    - for `x`, the exact within-step VJP `(∂h_t/∂x)ᵀ ḡ`, so layers below get exact spatial credit;
    - for the old state and the trace, zero: no backpropagation through time.

    `steps(model, state, trace, xs)` does the same for a block of steps at once.

    **Writing a rule.** A subclass is generic in its trace type (`AbstractAlgorithm[MyTrace]`)
    and implements three methods on one recurrent system — a cell, or for rules with
    `per_layer = False` a whole network's recurrent core — all taking `(cell, state, trace,
    x)` in that order: `init_cell_trace`, `cell_step` and `cell_tangent`. It may override
    `cell_steps` to compute a block of steps faster than one step at a time. A rule whose
    derivative depends on the layer that reads a cell's output may override `for_layer` (a copy
    configured per cell of a `Sequential`) and `cell_output_tangent` (the derivative of the
    cell's output, instead of that of its state through `output`), and then
    `cell_output_steps` for its blocks, as `EProp` does; such a rule may also define the credit
    its cell sends to the layer below (`cell_output_input_tangent`, exact by default), as
    `OTPE` does. Networks,
    argument checks and the derivative link are handled here.
    """

    #: Whether a `Sequential` gets one trace per cell (diagonal rules) or one for the whole
    #: recurrent core (exact RTRL).
    per_layer: AbstractClassVar[bool]
    #: Raise (through `eqx.error_if`) as soon as the state or trace holds a NaN or inf.
    check_finite: AbstractVar[bool]

    @abc.abstractmethod
    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> _Trace:
        """The initial (zero) trace of one recurrent system for one sample; `x` is an example
        input (only its shape and dtype matter)."""

    @abc.abstractmethod
    def cell_step(
        self, cell: AbstractCell, state: State, trace: _Trace, x: Input
    ) -> tuple[State, _Trace]:
        """One step of the system and of its trace, `(h_{t-1}, ε_{t-1}, x_t) -> (h_t, ε_t)`.
        Called on a cell whose parameters carry no derivative (the link supplies it)."""

    @abc.abstractmethod
    def cell_tangent(
        self, cell: AbstractCell, state: State, trace: _Trace, x: Input, params_tangent: Any
    ) -> State:
        """The trace applied to a tangent of the cell's parameters, `ε_t · δθ`: the change of
        `h_t` that the rule attributes to `δθ`. It must be linear in `params_tangent` (a pytree
        shaped like `eqx.filter(cell, eqx.is_inexact_array)`); its transpose, which JAX
        derives, contracts the trace with `ḡ = dL/dh_t` to give the online gradient. `state`
        and `x` are the step's inputs `h_{t-1}` and `x_t`, `trace` the new trace `ε_t`."""

    def cell_steps(
        self, cell: AbstractCell, state: State, trace: _Trace, xs: Input
    ) -> tuple[State, _Trace]:
        """Steps of one recurrent system over the leading (time) axis of `xs`.

        **Returns:** the new states `h_1 … h_T`, stacked along a leading axis, and the last
        trace; with the same values and derivatives as `T` single steps. This default keeps
        every step's trace for the derivatives, so its memory is `T` times the trace;
        algorithms with large traces override it.
        """
        params, static, frozen, (state, trace, stopped_xs) = freeze(cell, state, trace, xs)

        def body(carry, x):
            new_state, new_trace = self.cell_step(frozen, carry[0], carry[1], x)
            return (new_state, new_trace), (carry[0], new_state, new_trace)

        _, (previous, states, traces) = jax.lax.scan(body, (state, trace), stopped_xs)
        states, traces = self.checked(states, traces)

        def step_link(x, state, trace):
            derivative = StepDerivative(algorithm=self, state=state, trace=trace)
            return link(params, x, static=static, derivative=derivative)

        # The links of all steps at once: their transpose contracts the traces with the
        # cotangents of all steps in one product.
        links = jax.vmap(step_link)(xs, previous, traces)
        return jtu.tree_map(jnp.add, states, links), last(traces)

    def for_layer(self, layer: AbstractCell, consumer: Any) -> "AbstractAlgorithm":
        """The rule that runs `layer`, a cell of a `Sequential` whose output feeds `consumer`
        (the next layer, or `None` for the last). A rule whose derivative depends on what reads
        a cell's output returns a copy configured for it (`EProp` folds a leaky read-out's
        filter into the trace of the cell below); the default is the rule itself."""
        del layer, consumer
        return self

    def cell_structure(self, cell: AbstractCell, state: State, x: ExampleInput) -> Any:
        """The structure this rule reads from `cell` (a `CellStructure` for the diagonal rules),
        analysed once by `eqtrace.prepare` and given back to the rule by `with_structure`, or
        `None` (the default) for a rule that needs none. It does not raise the rule's refusal:
        `init_cell_trace` does."""
        del cell, state, x
        return None

    def with_structure(self, structure: Any) -> "AbstractAlgorithm":
        """This rule prepared for a cell of `structure` (what `cell_structure` returned for it,
        once `init_cell_trace` has accepted it): the rule that `eqtrace.prepare` puts in the
        plan to run that cell, which reads the structure instead of analysing the cell. The
        default, for a rule that needs no structure, is the rule itself."""
        del structure
        return self

    def relaxed(self) -> "AbstractAlgorithm":
        """This rule accepting approximations: for a rule that refuses cells breaking its
        assumptions unless told otherwise (`strict=True`), a copy with `strict=False`;
        otherwise (the default) the rule itself. `eqtrace.check` sizes the trace with it."""
        return self

    def cell_notes(self, cell: AbstractCell, state: State, x: ExampleInput) -> tuple[str, ...]:
        """What this rule, in particular, traces in `cell`, in plain words (one sentence a
        line), for `eqtrace.check` to print; none by default."""
        del cell, state, x
        return ()

    def trace_neuron_axes(self, structure: Any, site_axes: tuple[Any, ...], trace: Any) -> Any:
        """For each array of this rule's trace of one cell (laid out as `trace`, for one
        sample), the axis that holds the neurons, or `None`: a pytree shaped like `trace`,
        which `eqtrace.make_shardings` splits along a model axis. `site_axes` gives, per call
        site of `structure`, the output axis of each weight of its op. `None` (the default)
        if the trace has no neuron axes."""
        del structure, site_axes, trace
        return None

    @property
    def exact_within_blocks(self) -> bool:
        """Whether a block of steps (`cell_steps`) is differentiated exactly through the states
        within it (`ExactWindows`); if not (the default), only through each step's input. Cells
        without parameters, which no rule traces, are run the same way."""
        return False

    @property
    def defines_output_tangent(self) -> bool:
        """Whether `cell_output_tangent` gives the derivative of the cell's output. If not (the
        default), the output `y_t = output(h_t)` is differentiated through `cell_tangent`."""
        return False

    def cell_output_tangent(
        self, cell: AbstractCell, state: State, trace: _Trace, x: Input, params_tangent: Any
    ) -> Any:
        """The change of the output `y_t` that the rule attributes to a tangent of the cell's
        parameters, used instead of pushing `cell_tangent` through `output` when
        `defines_output_tangent`; arguments as for `cell_tangent`."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define the tangent of a cell's output."
        )

    def cell_output_input_tangent(
        self, cell: AbstractCell, state: State, trace: _Trace, x: Input, x_tangent: Any
    ) -> Any:
        """The change of the output `y_t` for a tangent of the step's input, when
        `defines_output_tangent`: what the layer below receives as credit. By default the
        exact within-step `∂y_t/∂x_t · δx`; a rule whose credit to the layer below is itself an
        estimate (`OTPE`) overrides it. Arguments as for `cell_output_tangent`, with
        `x_tangent` the input's tangent (symbolic zeros as `None`); linear in it."""
        del trace
        return output_input_tangent(cell, state, x, x_tangent)

    def cell_output_steps(
        self, cell: AbstractCell, state: State, trace: _Trace, xs: Input
    ) -> tuple[State, _Trace, Any]:
        """Steps of one recurrent system over the leading (time) axis of `xs`, with its outputs
        differentiated as `cell_output_tangent` says; used instead of `cell_steps` when
        `defines_output_tangent`.

        **Returns:** the new states `h_1 … h_T` and outputs `y_1 … y_T`, each stacked along a
        leading axis, and the last trace; with the same values and derivatives as `T` single
        steps. This default scans the steps (each step's output needs that step's trace); a
        rule may override it to pass over its trace once per block, as `EProp` does.
        """
        return scan_transitions(self, cell, state, trace, xs)

    def checked(self, state: State, trace: _Trace) -> tuple[State, _Trace]:
        """`(state, trace)`, raising at run time if `check_finite` and a value is not finite."""
        if not self.check_finite:
            return state, trace
        # Only the floating arrays pass through `error_if`, which refuses PRNG keys.
        arrays, rest = eqx.partition((state, trace), eqx.is_inexact_array)
        leaves = jtu.tree_leaves(arrays)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))
        arrays = eqx.error_if(
            arrays,
            jnp.logical_not(finite),
            f"{type(self).__name__}: the state or trace became non-finite (NaN or inf). Check "
            "the input and the learning rate, or lower the trace decay.",
        )
        return eqx.combine(arrays, rest)

    def init_trace(
        self, model: AbstractCell, state: State, x: ExampleInput | None = None, *, plan: Any = None
    ) -> Any:
        """The initial trace of `model` (a cell or a `Sequential`) for one sample, laid out as
        the plan of this rule for `model` says (`eqtrace.prepare`).

        **Arguments:**

        - `model`: the cell or network.
        - `state`: its state for one sample, e.g. `model.init_state()`.
        - `x`: an example input of one step (only its shape and dtype are used). Needed only
          when the model does not declare an `input_size`.
        - `plan`: `eqtrace.prepare(self, model, x)`, if prepared already; else it is prepared
          here.

        **Returns:** the trace pytree to pass to `step`.
        """
        return init_network_trace(self, model, state, x, plan)

    def step(
        self, model: AbstractCell, state: State, trace: Any, x: Input, *, plan: Any = None
    ) -> tuple[State, Any, Any]:
        """Advances `model` by one step and its trace by one update.

        **Arguments:**

        - `model`: the cell or `Sequential` network.
        - `state`: the previous state of one sample.
        - `trace`: the previous trace, from `init_trace` or an earlier `step`.
        - `x`: the input of this step for one sample.
        - `plan`: `eqtrace.prepare(self, model, x)`, if prepared already; else it is prepared
          here, which analyses each cell once per call (once per trace under `jax.jit`). Pass
          it when calling `step` many times outside `jit`; `eqtrace.make_online_step`
          prepares it once for you.

        **Returns:** `(state, trace, y)`, with `y = model.output(state)` at the new state.
        """
        return advance_network(self, model, state, trace, x, STEP, plan)

    def steps(
        self, model: AbstractCell, state: State, trace: Any, xs: Input, *, plan: Any = None
    ) -> tuple[State, Any, Any]:
        """Advances `model` over the leading (time) axis of `xs`: a block of `T` steps.

        The values and the derivatives are those of `T` calls of `step` — `jax.grad` of
        `Σ_t L(y_t)` is the sum of the `T` online gradients — but an algorithm may compute them
        in fewer passes over the trace (`DRTRL` passes once per block instead of once per step).

        **Arguments:** as for `step`, with `xs` holding `T` inputs of one sample along a leading
        axis.

        **Returns:** `(state, trace, ys)`: the last state and trace, and the `T` outputs stacked.
        """
        return advance_network(self, model, state, trace, xs, BLOCK, plan)
