"""Exact windows: backpropagation through time within a window of steps, a rule's trace across
windows."""

from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._algorithm import AbstractAlgorithm
from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._link import freeze, last


_Trace = TypeVar("_Trace")


class ExactWindows(AbstractAlgorithm[_Trace]):
    """Exact credit within windows of steps, the trace of `rule` across them (braintrace's
    `vjp_method="multi-step"`).

    Run in blocks (`eqtrace.make_online_block`, or `block_size=k` in `online_gradient` and
    `train_online`), each block of `k` steps is a window `x_1 … x_k`, started from the state
    and trace `(h_0, ε_0)` that the previous window left. Its first step is the rule's online
    step, whose parameter derivative is the rule's new trace `ε_1`; the next steps are the plain
    cell `h_t = F(h_{t-1}, x_t; θ)`, differentiated exactly. The gradient of the window's loss
    `Σ_t L_t` is then

    $$
    ∇θ = λ_1^⊤ ε_1 + \\sum_{s=2}^{k} λ_s^⊤ \\frac{∂F_s}{∂θ},\\qquad
    λ_s = \\sum_{t=s}^{k} \\Big(\\frac{dh_t}{dh_s}\\Big)^⊤ \\frac{∂L_t}{∂h_t},
    $$

    with `λ_s` the adjoint of backpropagation through time within the window. Only the step
    into the window, `dh_1/dθ`, is the rule's approximation `ε_1`; the derivative with respect to
    the inputs is exact over the whole window, so in a `Sequential` the layers compose exactly
    within it. Meanwhile the rule advances its trace over all `k` steps (values only) for the
    next window.

    When it is exact: whenever `ε_1 = dh_1/dθ`, which holds for exact RTRL, for every rule in
    the first window from a zero trace (so `k = T` is BPTT), and for D-RTRL on one
    element-wise-recurrent layer (so every `k` is BPTT there). `k = 1` is the rule itself.
    Between those, a longer window recovers more of the credit that the rule's trace drops,
    at the memory of truncated BPTT: a window keeps its `k` states (and the cell's residuals)
    for the backward pass, besides one trace. Its cost is the rule's `k` steps plus one BPTT of
    `k` steps; D-RTRL updates its trace in one pass per window (its block computation).

    A wrapper rule, not a driver option, so that every rule and every driver gets windows
    without change: the trace is `rule`'s (`init_trace`, checkpoints and the trace's memory
    are unchanged), and stepping (`step`, `eqtrace.make_online_step`) is `rule`'s own step,
    a window of one.

    **Arguments:**

    - `rule`: the online rule whose trace carries the credit across windows, e.g.
      `eqtrace.DRTRL()`.
    """

    rule: AbstractAlgorithm[_Trace]
    check_finite: bool = eqx.field(repr=False)

    def __init__(self, rule: AbstractAlgorithm[_Trace]):
        self.rule = rule
        # The rule's own option, copied: the window's states and traces are the rule's.
        self.check_finite = bool(getattr(rule, "check_finite", False))

    def __check_init__(self):
        if not isinstance(self.rule, AbstractAlgorithm):
            received = self.rule.__name__ if isinstance(self.rule, type) else repr(self.rule)
            raise TypeError(
                "ExactWindows: `rule` must be an online rule (an instance of "
                f"`eqtrace.AbstractAlgorithm`), but received {received}. Pass an instance, "
                "e.g. `eqtrace.ExactWindows(eqtrace.DRTRL())`."
            )
        if isinstance(self.rule, ExactWindows):
            raise ValueError(
                "ExactWindows: `rule` is already `ExactWindows(...)`; windows of windows are "
                "the same windows. Wrap the rule once: `eqtrace.ExactWindows(rule)`."
            )
        if self.rule.defines_output_tangent:
            raise ValueError(
                f"ExactWindows cannot wrap {self.rule}: it differentiates the cell's output "
                "itself (e-prop's read-out filter), while a window's exact credit runs through "
                "the states. Use `eqtrace.ExactWindows(eqtrace.DRTRL())`: within each window "
                "the leaky read-out's effect is credited exactly."
            )

    def for_layer(self, layer: AbstractCell, consumer: Any) -> "ExactWindows":
        """Windows of the rule as it configures itself for `layer` (see
        `AbstractAlgorithm.for_layer`)."""
        rule = self.rule.for_layer(layer, consumer)
        return self if rule is self.rule else ExactWindows(rule)

    def cell_structure(self, cell: AbstractCell, state: State, x: ExampleInput) -> Any:
        return self.rule.cell_structure(cell, state, x)

    def with_structure(self, structure: Any) -> "ExactWindows":
        return ExactWindows(self.rule.with_structure(structure))

    def relaxed(self) -> "ExactWindows":
        rule = self.rule.relaxed()
        return self if rule is self.rule else ExactWindows(rule)

    def cell_notes(self, cell: AbstractCell, state: State, x: ExampleInput) -> tuple[str, ...]:
        return self.rule.cell_notes(cell, state, x)

    def trace_neuron_axes(self, structure: Any, site_axes: tuple[Any, ...], trace: Any) -> Any:
        return self.rule.trace_neuron_axes(structure, site_axes, trace)

    @property
    def per_layer(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        """As for `rule`: one trace per cell of a `Sequential`, or one for its core."""
        return self.rule.per_layer

    @property
    def exact_within_blocks(self) -> bool:
        return True

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> _Trace:
        return self.rule.init_cell_trace(cell, state, x)

    def cell_step(
        self, cell: AbstractCell, state: State, trace: _Trace, x: Input
    ) -> tuple[State, _Trace]:
        return self.rule.cell_step(cell, state, trace, x)

    def cell_tangent(
        self, cell: AbstractCell, state: State, trace: _Trace, x: Input, params_tangent: Any
    ) -> State:
        return self.rule.cell_tangent(cell, state, trace, x, params_tangent)

    def cell_steps(
        self, cell: AbstractCell, state: State, trace: _Trace, xs: Input
    ) -> tuple[State, _Trace]:
        """One window over the leading (time) axis of `xs`: the rule's step into it, then the
        cell differentiated exactly.

        **Returns:** the states `h_1 … h_k`, stacked, and the rule's trace after the `k` steps.
        """
        head = jtu.tree_map(lambda a: a[:1], xs)
        first, first_trace = self.rule.cell_steps(cell, state, trace, head)
        if jtu.tree_leaves(xs)[0].shape[0] == 1:
            return first, first_trace
        tail = jtu.tree_map(lambda a: a[1:], xs)

        def exact(h, x):
            h, _ = cell(h, x)
            return h, h

        _, rest = jax.lax.scan(exact, last(first), tail)
        states = jtu.tree_map(lambda a, b: jnp.concatenate([a, b]), first, rest)
        # The trace's values over the rest of the window, by the rule's own block computation.
        _, _, frozen, (h_1, trace_1, stopped_tail) = freeze(cell, last(first), first_trace, tail)
        return states, _trace_after(self.rule, frozen, h_1, trace_1, stopped_tail)


def _trace_after(rule: AbstractAlgorithm, cell, state, trace, xs):
    """The values of `rule`'s trace after the steps of `xs` (the cell's parameters frozen): by
    the rule's own block computation if it has one (D-RTRL's passes once over the trace), else
    by scanning its step, which keeps one trace (the default block keeps one per step, for
    derivatives that are not needed here)."""
    if type(rule).cell_steps is not AbstractAlgorithm.cell_steps:
        return jax.lax.stop_gradient(rule.cell_steps(cell, state, trace, xs)[1])

    def body(carry, x):
        state, trace = carry
        return rule.checked(*rule.cell_step(cell, state, trace, x)), None

    (_, trace), _ = jax.lax.scan(body, (state, trace), xs)
    return trace
