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
    normaliser `n_t = 1 + α + … + α^{t-1}` (the weight of the sums in the traces; with
    separate decays, of the sums in the output traces, and `input_normaliser` that of the
    input traces)."""

    inputs: tuple[Array | None, ...]  # `None` for calls that do not reach the state (read-outs)
    outputs: tuple[Array | None, ...]
    params: tuple[Array | None, ...]
    normaliser: Float[Array, ""]
    #: With separate decays, `n_x = 1 + α_x + … + α_x^{t-1}`, the weight of the sums in the
    #: input traces (a bias's input trace); `None` when the decays are equal (then `n_x = n`).
    input_normaliser: Float[Array, ""] | None = None


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

    **Separate decays** (the reference system's `pp_prop` with `decay_or_rank=(α_x, α_f)`):
    the input trace decays by `α_x`, the output trace by `α_f`, and each has its own normaliser,
    `n_x ← α_x n_x + 1` (the input trace of a bias) and `n_f ← α_f n_f + 1` (the bias
    correction, which concerns the output trace, the exponential average); the gradient is
    `VJP_W[op(ε_x; ·)](Σ_k ḡ^k ⊙ ε_f[k]) / n_f`. With `α_x = α_f` it is the rule above,
    bit for bit.

    **Arguments** (give exactly one of `decay` and `rank`, or both `input_decay` and
    `output_decay`):

    - `decay`: the smoothing factor `α ∈ [0, 1)` of both traces (or the pair `(α_x, α_f)`).
    - `rank`: the rank `r ≥ 1` of the approximation, `α = (r − 1)/(r + 1)`.
    - `input_decay`, `output_decay`: `α_x` and `α_f`, each in `[0, 1)`, for separate decays
      (kept as `decay = (α_x, α_f)`; equal ones as the single `decay`).
    - `bias_correction`: divide by `1 − α_f^{t+1}` (default) or not (then the gradient is
      `(1 − α_f)` times the one above without the division by `n_f`).
    - `strict`: raise if the cell breaks the diagonal assumptions (see `eqtrace.check`).
    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf. Off by default: the check costs a pass over the trace every step.
    """

    #: `α`, or the pair `(α_x, α_f)` when the traces have separate decays.
    decay: float | tuple[float, float]
    bias_correction: bool = True
    strict: bool = True
    check_finite: bool = False

    def __init__(
        self,
        decay: float | int | tuple[float, float] | None = None,
        *,
        rank: float | int | None = None,
        input_decay: float | int | None = None,
        output_decay: float | int | None = None,
        bias_correction: bool = True,
        strict: bool = True,
        check_finite: bool = False,
    ):
        if isinstance(decay, tuple | list):
            if len(decay) != 2 or input_decay is not None or output_decay is not None:
                raise ValueError(
                    "PPProp: a pair `decay` is `(input_decay, output_decay)`, given alone; "
                    f"received decay={decay}, input_decay={input_decay}, "
                    f"output_decay={output_decay}."
                )
            decay, (input_decay, output_decay) = None, decay
        separate = (input_decay, output_decay) != (None, None)
        if separate:
            if decay is not None or rank is not None or None in (input_decay, output_decay):
                raise ValueError(
                    "PPProp: for separate decays give both `input_decay` (α_x) and "
                    "`output_decay` (α_f), and neither `decay` nor `rank`; received "
                    f"decay={decay}, rank={rank}, input_decay={input_decay}, "
                    f"output_decay={output_decay}."
                )
        elif (decay is None) == (rank is None):
            raise ValueError(
                "PPProp: give exactly one of `decay` (α in [0, 1)) or `rank` (r >= 1, "
                "α = (r - 1)/(r + 1)), or both `input_decay` and `output_decay`; received "
                f"decay={decay}, rank={rank}."
            )
        if rank is not None:
            if rank < 1:
                raise ValueError(f"PPProp: `rank` must be >= 1, but received {rank}.")
            decay = (rank - 1) / (rank + 1)
        if not separate:
            input_decay = output_decay = decay
        for name, value in (("input_decay", input_decay), ("output_decay", output_decay)):
            assert value is not None
            if not 0 <= value < 1:
                shown = name if separate else "decay"
                raise ValueError(f"PPProp: `{shown}` must lie in [0, 1), but received {value}.")
        assert input_decay is not None and output_decay is not None
        pair = (float(input_decay), float(output_decay))
        # One number when the decays are equal: the rule, its description (in checkpoints)
        # and its trace are then those of a single decay.
        self.decay = pair[0] if pair[0] == pair[1] else pair
        self.bias_correction = bias_correction
        self.strict = strict
        self.check_finite = check_finite

    @property
    def input_decay(self) -> float:
        """`α_x`, the decay of the input traces."""
        return self.decay[0] if isinstance(self.decay, tuple) else self.decay

    @property
    def output_decay(self) -> float:
        """`α_f`, the decay of the output traces (and of the bias correction)."""
        return self.decay[1] if isinstance(self.decay, tuple) else self.decay

    @property
    def _separate(self) -> bool:
        return isinstance(self.decay, tuple)

    def refuse(self, cell: AbstractCell, structure: CellStructure, state: State) -> None:
        del cell
        dtype = state_dtype(state)
        decays = {"input_decay": self.input_decay, "output_decay": self.output_decay}
        for name, value in decays.items() if self._separate else [("decay", self.input_decay)]:
            if np.asarray(value, dtype) == 1:
                advice = f"a smaller `{name}`" if self._separate else "a smaller `rank` or `decay`"
                raise ValueError(
                    f"PPProp: the {name.replace('_', ' ')} α = {value!r} rounds to 1.0 in "
                    f"{jnp.dtype(dtype).name}, the dtype of the state of {structure.cell_name}: "
                    "the traces would never forget and their sums would grow without bound. "
                    f"Use {advice}, or a wider dtype for the model."
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
            input_normaliser=jnp.zeros((), _normaliser_dtype(state)) if self._separate else None,
        )

    def cell_step(
        self, cell: AbstractCell, state: State, trace: PPPropTrace, x: Input
    ) -> tuple[State, PPPropTrace]:
        structure = self.prepared()
        lin = linearise(cell, structure, state, x)
        alpha_x, alpha_f = self.input_decay, self.output_decay
        # Calls that do not reach the state (read-outs) have `None` traces and are skipped, as
        # are the output traces of calls that share an earlier call's.
        inputs = tuple(
            None if e is None else alpha_x * e + a.astype(e.dtype)
            for e, a in zip(trace.inputs, lin.op_inputs)
        )
        outputs = tuple(
            None
            if e is None
            else alpha_f * mix(to_outputs(structure, lin.jacobian, i), e).astype(e.dtype)
            + df.astype(e.dtype)
            for i, (e, df) in enumerate(zip(trace.outputs, lin.op_sensitivities))
        )
        n_x = trace.input_normaliser
        return lin.new_state, PPPropTrace(
            inputs=inputs,
            outputs=outputs,
            params=step_param_traces(structure, lin, trace.params),
            normaliser=alpha_f * trace.normaliser + 1,
            input_normaliser=None if n_x is None else alpha_x * n_x + 1,
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
        # The scale of the input traces: 1/n_f with bias correction, else (1 − α_f). It scales
        # the (small) input trace, a primal value, rather than the tangent. A bias's input trace
        # is `n_x` (`n` itself when the decays are equal).
        n = trace.normaliser
        n_x = n if trace.input_normaliser is None else trace.input_normaliser
        scale = 1 / n if self.bias_correction else jnp.full_like(n, 1 - self.output_decay)
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
                bias_input_trace = (scale * n_x).astype(bias.dtype)
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
