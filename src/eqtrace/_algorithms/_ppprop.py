"""pp-prop (ES-D-RTRL): D-RTRL with each weight trace factorised into input and output traces."""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._ops import algebra
from .._structure import CellStructure
from ._diagonal import (
    AbstractDiagonalAlgorithm,
    from_outputs,
    init_param_traces,
    linearise,
    mix,
    op_dtype,
    param_tangents,
    state_dtype,
    step_param_traces,
    to_outputs,
    unflatten_like,
)


class PPPropTrace(eqx.Module):
    """pp-prop's trace: per call of a synaptic op in a step, an input trace `ε_x` (shaped
    like the op's input) and an output trace `ε_f` per state leaf (`(K, *u_shape)`; calls whose
    outputs are summed, such as `W_in x + W_rec s`, have the same `ε_f`, kept once, with the
    first of them); per other parameter its element-wise (or dense) trace; and the bias
    normaliser `n_t = 1 + α + … + α^{t-1}` (the weight of the sums in the traces)."""

    inputs: tuple[Array | None, ...]  # `None` for calls that do not reach the state (read-outs)
    outputs: tuple[Array | None, ...]
    params: tuple[Array | None, ...]
    normaliser: Float[Array, ""]


class PPProp(AbstractDiagonalAlgorithm[PPPropTrace]):
    """pp-prop, or ES-D-RTRL: D-RTRL with each weight trace factorised into an exponentially
    smoothed input trace and output trace (Wang et al., *Nature Communications*, 2026).

    $$
    \\begin{aligned}
    ε_x[o] &← α ε_x[o] + a_t, \\qquad
    ε_f[k, o] ← α \\sum_m D_t[k, m] ⊙ ε_f[m, o] + ∂h^k_t/∂u_o, \\qquad
    n ← α n + 1, \\\\
    ∇W_o &= \\mathrm{VJP}_W[op_o(ε_x[o]; ·)]\\Big(\\sum_k ḡ^k ⊙ ε_f[k, o]\\Big) / n,
    \\end{aligned}
    $$

    with `n = 1 + α + … + α^t = (1 − α^{t+1})/(1 − α)` after `t + 1` steps from `init_trace`.
    This is the paper's rule, whose output trace is `(1 − α) ε_f` and whose gradient is divided
    by `1 − α^{t+1}` (bias correction, as in Adam), rearranged so that no quantity cancels: the
    first step equals D-RTRL exactly for any α, the normaliser is bounded by `1/(1 − α)` (no
    step counter to overflow on endless streams), and α close to 1 loses no precision. A bias,
    whose input is the constant 1, has input trace `n`. An op called several times in a step
    has traces per call, and its gradient sums over them. Memory per
    sample is `O(K·(I + O))` per op instead of `O(K·I·O)`, and it works for any op linear in its
    weights: dense, masked, convolution, embedding. Per-neuron parameters get the exact
    element-wise trace of D-RTRL.

    **Arguments** (give exactly one of `decay` and `rank`):

    - `decay`: the smoothing factor `α ∈ [0, 1)`.
    - `rank`: the rank `r ≥ 1` of the approximation, `α = (r − 1)/(r + 1)`.
    - `bias_correction`: divide by `1 − α^{t+1}` (default) or not (then the gradient is
      `(1 − α)` times the one above without the division by `n`).
    - `strict`: raise if the cell breaks the diagonal assumptions (see `eqtrace.check`).
    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf. Off by default: the check costs a pass over the trace every step.
    """

    decay: float
    bias_correction: bool = True
    strict: bool = True
    check_finite: bool = False

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

    def refuse(self, cell: AbstractCell, structure: CellStructure, state: State) -> None:
        del cell
        dtype = state_dtype(state)
        if np.asarray(self.decay, dtype) == 1:
            raise ValueError(
                f"PPProp: the decay α = {self.decay!r} rounds to 1.0 in {jnp.dtype(dtype).name}, "
                f"the dtype of the state of {structure.cell_name}: the traces would never forget "
                "and their sums would grow without bound. Use a smaller `rank` or `decay`, or "
                "a wider dtype for the model."
            )

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> PPPropTrace:
        structure = self.required_structure(cell, state, x)
        sites = structure.site_modules(cell)
        k = structure.num_leaves
        return PPPropTrace(
            inputs=tuple(
                jnp.zeros(site.input_shape, op_dtype(op)) if site.traced else None
                for site, op in zip(structure.sites, sites)
            ),
            outputs=tuple(
                jnp.zeros((k, *site.output_shape), op_dtype(op))
                if site.traced and site.sensitivity_source == i
                else None
                for i, (site, op) in enumerate(zip(structure.sites, sites))
            ),
            params=init_param_traces(structure, cell),
            normaliser=jnp.zeros((), _normaliser_dtype(state)),
        )

    def cell_step(
        self, cell: AbstractCell, state: State, trace: PPPropTrace, x: Input
    ) -> tuple[State, PPPropTrace]:
        structure = self.prepared()
        lin = linearise(cell, structure, state, x)
        alpha = self.decay
        # Calls that do not reach the state (read-outs) have `None` traces and are skipped, as
        # are the output traces of calls that share an earlier call's.
        inputs = tuple(
            None if e is None else alpha * e + a.astype(e.dtype)
            for e, a in zip(trace.inputs, lin.op_inputs)
        )
        outputs = tuple(
            None
            if e is None
            else alpha * mix(to_outputs(structure, lin.jacobian, i), e).astype(e.dtype)
            + df.astype(e.dtype)
            for i, (e, df) in enumerate(zip(trace.outputs, lin.op_sensitivities))
        )
        return lin.new_state, PPPropTrace(
            inputs=inputs,
            outputs=outputs,
            params=step_param_traces(structure, lin, trace.params),
            normaliser=alpha * trace.normaliser + 1,
        )

    def cell_tangent(
        self, cell: AbstractCell, state: State, trace: PPPropTrace, x: Input, params_tangent: Any
    ) -> State:
        structure = self.prepared()
        op_tangents, other_tangents = structure.split_tangent(params_tangent)
        dtype = state_dtype(state)
        # One row per state leaf, kept apart (as in D-RTRL), so the transpose needs no
        # reduction over leaves.
        rows = list(param_tangents(structure, trace.params, other_tangents, dtype))
        # The scale of the input traces: 1/n with bias correction, else (1 − α). It scales the
        # (small) input trace, a primal value, rather than the tangent.
        n = trace.normaliser
        scale = 1 / n if self.bias_correction else jnp.full_like(n, 1 - self.decay)
        # `du` per group of calls sharing an output trace, summed before it meets the trace.
        changes: dict[int, jax.Array] = {}
        for op, site, eps_x, delta in zip(
            structure.site_modules(cell), structure.sites, trace.inputs, op_tangents
        ):
            if eps_x is None:  # A read-out call: exact gradient through `output`, no trace.
                continue
            rules = algebra(op)
            bias = rules.bias(delta)
            if bias is not None:
                bias_input_trace = (scale * n).astype(bias.dtype)
                delta = eqx.tree_at(rules.bias, delta, bias * bias_input_trace)
            a = eps_x * scale.astype(eps_x.dtype)
            _, du = eqx.filter_jvp(functools.partial(rules.apply, a=a), (op,), (delta,))
            source = site.sensitivity_source
            changes[source] = du if source not in changes else changes[source] + du
        for i, du in changes.items():
            eps_f = trace.outputs[i]
            assert eps_f is not None
            for k in range(len(rows)):
                rows[k] = rows[k] + from_outputs(structure, eps_f[k] * du, i).astype(dtype)
        return unflatten_like(state, rows)


def _normaliser_dtype(state) -> jnp.dtype:
    """At least float32: the normaliser approaches `1/(1 − α)`, too coarse in 16 bits."""
    return jnp.promote_types(state_dtype(state), jnp.float32)
