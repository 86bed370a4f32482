from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._algorithm import AbstractAlgorithm
from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._ops import contract, op_params, outer, spread, weights_reach_one_output
from .._structure import find_ops
from ._diagonal import (
    cell_structure,
    from_outputs,
    init_param_traces,
    linearise,
    param_tangents,
    split_tangent,
    to_outputs,
    unflatten_like,
    update_param_traces,
)


def _propagate(spread_jacobian, trace, immediate):
    """`ε[…, k] ← Σ_m B(D[k, m]) ⊙ ε[…, m] + VJP_W(∂h^k/∂u)` for one parameter array. The leaf
    axis is the last, so the K-by-K mixing stays within each weight's few values and XLA fuses
    the update into one pass over the trace."""
    dtype = immediate.dtype
    new = immediate + sum(
        spread_jacobian[..., m] * trace[..., m : m + 1].astype(dtype)
        for m in range(trace.shape[-1])
    )
    return new.astype(trace.dtype)


class DRTRLTrace(eqx.Module):
    """D-RTRL's trace: per synaptic op, its parameters' traces for all state leaves, shaped
    `(*W.shape, K)` (`None` for ops that do not reach the state, i.e. read-outs); per other
    parameter, its element-wise (or dense) trace."""

    ops: tuple[Any, ...]
    params: tuple[jax.Array, ...]


class DRTRL(AbstractAlgorithm):
    """Diagonal RTRL with parameter-dimension traces (Wang et al., *Nature Communications*, 2026).

    For every state leaf `k` and synaptic op `o` with output `u_o = op_o(a_t; W_o)`:

    $$
    ε_t[k, o] = \\sum_m B_o(D_t[k, m]) ⊙ ε_{t-1}[m, o] + \\mathrm{VJP}_W[op_o(a_t; ·)](∂h^k_t/∂u_o),
    $$

    where `D_t[k, m] = ∂h^k_t/∂h^m_{t-1}` with every op output held fixed (element-wise) and
    `B_o` spreads a per-output vector over `W_o` (for a dense op, the trace gains
    `∂h/∂u ⊗ a_t` each step). The online gradient is `∇W_o = Σ_k B_o(ḡ^k) ⊙ ε_t[k, o]`.
    Per-neuron parameters (e.g. a learnable time constant) get the exact element-wise trace
    `ε = Σ_m D ⊙ ε + ∂h/∂p`, small shared parameters a dense one.

    It is exact (equal to BPTT) for a single layer whose recurrence is element-wise, followed by
    a stateless read-out; with recurrent weights it drops the paths through other neurons.
    Memory per sample is `O(K·|θ|)`. Each cell of a `Sequential` has its own trace; the credit
    between layers within a step is exact.

    **Arguments:**

    - `strict`: raise if the cell breaks the diagonal assumptions (see `eqtrace.check`).
      With `strict=False` the rule runs anyway as an approximation.
    - `trace_dtype`: dtype in which the weight traces are stored (e.g. `jnp.bfloat16` to halve
      their memory and bandwidth); the update is computed in the parameters' dtype. Defaults
      to the parameters' dtype.
    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf. Off by default: the check costs a pass over the trace every step.
    """

    strict: bool = True
    trace_dtype: Any = None
    check_finite: bool = False
    per_layer: ClassVar[bool] = True

    def _structure(self, cell, state, x):
        structure = cell_structure("DRTRL", cell, state, x, self.strict)
        for path, op in find_ops(cell):
            if not weights_reach_one_output(op):
                raise ValueError(
                    f"DRTRL cannot trace the op `{path}` ({type(op).__name__}) of "
                    f"{structure.cell_name}: it shares each weight across many outputs, so a "
                    "weight-shaped trace per neuron is not defined. Use `eqtrace.PPProp(...)`, "
                    "whose input/output traces handle shared weights."
                )
        return structure

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> DRTRLTrace:
        structure = self._structure(cell, state, x)
        k = structure.num_leaves
        ops = tuple(
            jtu.tree_map(
                lambda w: jnp.zeros((*w.shape, k), self.trace_dtype or w.dtype), op_params(op)
            )
            if traced
            else None
            for (_, op), traced in zip(find_ops(cell), structure.op_traced)
        )
        return DRTRLTrace(ops=ops, params=init_param_traces(structure, cell))

    def update(
        self, cell: AbstractCell, state: State, trace: DRTRLTrace, x: Input
    ) -> tuple[State, DRTRLTrace]:
        structure = self._structure(cell, state, x)
        lin = linearise(cell, structure, state, x)
        new_ops = []
        for i, ((_, op), a, df, eps) in enumerate(
            zip(find_ops(cell), lin.op_inputs, lin.op_sensitivities, trace.ops)
        ):
            if eps is None:  # A read-out op: exact gradient through `output`, no trace.
                new_ops.append(None)
                continue
            d_out = jnp.moveaxis(to_outputs(structure, lin.jacobian, i), (0, 1), (-2, -1))
            propagate = spread(op, d_out)  # leaves (…, K, K)
            immediate = outer(op, a, jnp.moveaxis(df, 0, -1))  # leaves (…, K)
            new_ops.append(jtu.tree_map(_propagate, propagate, eps, immediate))
        new_params = update_param_traces(structure, lin, trace.params)
        return lin.new_state, DRTRLTrace(ops=tuple(new_ops), params=new_params)

    def parameter_tangent(
        self, cell: AbstractCell, state: State, x: Input, trace: DRTRLTrace, params_tangent
    ) -> State:
        structure = self._structure(cell, state, x)
        op_tangents, other_tangents = split_tangent(params_tangent)
        from_params = param_tangents(structure, trace.params, other_tangents)
        # One row per state leaf, kept apart: a leaf the loss does not reach gets a symbolic
        # zero cotangent, and JAX then skips reading that leaf's trace in the backward pass.
        rows = []
        for k in range(structure.num_leaves):
            row = from_params[k]
            for i, ((_, op), eps, delta) in enumerate(zip(find_ops(cell), trace.ops, op_tangents)):
                if eps is not None:
                    eps_k = jtu.tree_map(lambda e, d: e[..., k].astype(d.dtype), eps, delta)
                    row = row + from_outputs(structure, contract(op, eps_k, delta), i)
            rows.append(row)
        return unflatten_like(state, rows)
