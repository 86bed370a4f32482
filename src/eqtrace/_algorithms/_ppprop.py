import functools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from .._algorithm import AbstractAlgorithm
from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._ops import apply_op, bias_of, op_params
from .._structure import find_ops
from ._diagonal import (
    cell_structure,
    from_outputs,
    init_param_traces,
    linearise,
    mix,
    param_tangents,
    split_tangent,
    to_outputs,
    unflatten_like,
    update_param_traces,
)


class PPPropTrace(eqx.Module):
    """pp-prop's trace: per synaptic op an input trace `ε_x` (shaped like the op's input) and
    an output trace `ε_f` per state leaf (`(K, *u_shape)`; ops whose outputs are summed, such
    as `W_in x + W_rec s`, have the same `ε_f`, kept once, with the first of them); per other
    parameter its element-wise (or dense) trace; and the number of steps since `init_trace`."""

    inputs: tuple[Array | None, ...]  # `None` for ops that do not reach the state (read-outs)
    outputs: tuple[Array | None, ...]
    params: tuple[Array, ...]
    steps: Int[Array, ""]


class PPProp(AbstractAlgorithm):
    """pp-prop, or ES-D-RTRL: D-RTRL with each weight trace factorised into an exponentially
    smoothed input trace and output trace (Wang et al., *Nature Communications*, 2026).

    $$
    \\begin{aligned}
    ε_x[o] &← α ε_x[o] + a_t, \\qquad
    ε_f[k, o] ← α \\sum_m D_t[k, m] ⊙ ε_f[m, o] + (1 − α)\\, ∂h^k_t/∂u_o, \\\\
    ∇W_o &= \\mathrm{VJP}_W[op_o(ε_x[o]; ·)]\\Big(\\sum_k ḡ^k ⊙ ε_f[k, o]\\Big) / (1 − α^{t+1}),
    \\end{aligned}
    $$

    with `t` counting steps from `init_trace` (`t = 0` at the first step). The division by
    `1 − α^{t+1}` (bias correction, as in Adam) makes the first step equal D-RTRL exactly; a
    bias, whose input is the constant 1, has input trace `(1 − α^{t+1})/(1 − α)`. Memory per
    sample is `O(K·(I + O))` per op instead of `O(K·I·O)`, and it works for any op linear in its
    weights: dense, masked, convolution, embedding. Per-neuron parameters get the exact
    element-wise trace of D-RTRL.

    **Arguments** (give exactly one of `decay` and `rank`):

    - `decay`: the smoothing factor `α ∈ [0, 1)`.
    - `rank`: the rank `r ≥ 1` of the approximation, `α = (r − 1)/(r + 1)`.
    - `bias_correction`: divide by `1 − α^{t+1}` (default) or not.
    - `strict`: raise if the cell breaks the diagonal assumptions (see `eqtrace.check`).
    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf. Off by default: the check costs a pass over the trace every step.
    """

    decay: float
    bias_correction: bool = True
    strict: bool = True
    check_finite: bool = False
    per_layer: ClassVar[bool] = True

    def __init__(
        self,
        decay: float | int | None = None,
        *,
        rank: float | int | None = None,
        bias_correction: bool = True,
        strict: bool = True,
        check_finite: bool = False,
    ):
        if (decay is None) == (rank is None):
            raise ValueError(
                "PPProp: give exactly one of `decay` (α in [0, 1)) or `rank` (r >= 1, "
                f"α = (r - 1)/(r + 1)); received decay={decay}, rank={rank}."
            )
        if rank is not None:
            if rank < 1:
                raise ValueError(f"PPProp: `rank` must be >= 1, but received {rank}.")
            decay = (rank - 1) / (rank + 1)
        assert decay is not None
        if not 0 <= decay < 1:
            raise ValueError(f"PPProp: `decay` must lie in [0, 1), but received {decay}.")
        self.decay = float(decay)
        self.bias_correction = bias_correction
        self.strict = strict
        self.check_finite = check_finite

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> PPPropTrace:
        structure = cell_structure("PPProp", cell, state, x, self.strict)
        ops = find_ops(cell)
        dtypes = [jnp.result_type(*jax.tree_util.tree_leaves(op_params(op))) for _, op in ops]
        k = structure.num_leaves
        return PPPropTrace(
            inputs=tuple(
                jnp.zeros(shape, dtype) if traced else None
                for shape, dtype, traced in zip(
                    structure.op_input_shapes, dtypes, structure.op_traced
                )
            ),
            outputs=tuple(
                jnp.zeros((k, *shape), dtype) if traced and source == i else None
                for i, (shape, dtype, traced, source) in enumerate(
                    zip(
                        structure.op_output_shapes,
                        dtypes,
                        structure.op_traced,
                        structure.op_sensitivity_source,
                    )
                )
            ),
            params=init_param_traces(structure, cell),
            steps=jnp.zeros((), jnp.int32),
        )

    def update(
        self, cell: AbstractCell, state: State, trace: PPPropTrace, x: Input
    ) -> tuple[State, PPPropTrace]:
        structure = cell_structure("PPProp", cell, state, x, self.strict)
        lin = linearise(cell, structure, state, x)
        alpha = self.decay
        # Ops that do not reach the state (read-outs) have `None` traces and are skipped, as
        # are the output traces of ops that share an earlier op's.
        inputs = tuple(
            None if e is None else alpha * e + a for e, a in zip(trace.inputs, lin.op_inputs)
        )
        outputs = tuple(
            None
            if e is None
            else alpha * mix(to_outputs(structure, lin.jacobian, i), e) + (1 - alpha) * df
            for i, (e, df) in enumerate(zip(trace.outputs, lin.op_sensitivities))
        )
        return lin.new_state, PPPropTrace(
            inputs=inputs,
            outputs=outputs,
            params=update_param_traces(structure, lin, trace.params),
            steps=trace.steps + 1,
        )

    def parameter_tangent(
        self, cell: AbstractCell, state: State, x: Input, trace: PPPropTrace, params_tangent
    ) -> State:
        structure = cell_structure("PPProp", cell, state, x, self.strict)
        op_tangents, param_tangents_ = split_tangent(params_tangent)
        # One row per state leaf, kept apart (as in D-RTRL), so the transpose needs no
        # reduction over leaves.
        rows = list(param_tangents(structure, trace.params, param_tangents_))
        alpha = self.decay
        # 1 − α^{t+1}, with t + 1 the number of steps taken; a bias's input trace is that
        # divided by (1 − α). The correction scales the (small) input trace, a primal value,
        # rather than the tangent.
        accumulated = 1 - alpha ** trace.steps.astype(rows[0].dtype)
        scale = 1 / accumulated if self.bias_correction else jnp.ones_like(accumulated)
        # `du` per group of ops sharing an output trace, summed before it meets the trace.
        changes: dict[int, jax.Array] = {}
        for (_, op), eps_x, delta, source in zip(
            find_ops(cell), trace.inputs, op_tangents, structure.op_sensitivity_source
        ):
            if eps_x is None:  # A read-out op: exact gradient through `output`, no trace.
                continue
            if bias_of(op) is not None:
                bias_input_trace = scale * accumulated / (1 - alpha)
                delta = eqx.tree_at(lambda d: d.bias, delta, delta.bias * bias_input_trace)
            _, du = eqx.filter_jvp(functools.partial(apply_op, a=eps_x * scale), (op,), (delta,))
            changes[source] = du if source not in changes else changes[source] + du
        for i, du in changes.items():
            eps_f = trace.outputs[i]
            assert eps_f is not None
            for k in range(len(rows)):
                rows[k] = rows[k] + from_outputs(structure, eps_f[k] * du, i)
        return unflatten_like(state, rows)
