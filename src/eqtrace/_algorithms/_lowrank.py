"""Low-rank RTRL: a diagonal rule's trace plus a rank-r online correction of the influence it
drops, between D-RTRL (rank 0) and exact RTRL (full rank)."""

import copy
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._algorithm import AbstractAlgorithm
from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from ._diagonal import flat_leaves, mix, unflatten_like
from ._drtrl import DRTRL, AbstractWeightTraceAlgorithm
from ._rtrl import real_ravel
from ._uoro import _require_forward_mode


class LowRankRTRLTrace(eqx.Module):
    """`LowRankRTRL`'s trace: the base rule's trace `ε_t` (the influence `N_t` it keeps) and
    the factors of the correction `E_t = U_t V_tᵀ ≈ M_t − N_t`: `state_factors` `U_t`, whose
    `r` orthonormal columns are shaped like the flattened state (leaves stacked, as the
    diagonal rules lay them out), and `param_factors` `V_t`, whose `r` columns are shaped like
    the flattened real parameters."""

    base: Any
    state_factors: Float[Array, "state rank"]
    param_factors: Float[Array, "params rank"]


def _check_int(name: str, value: Any, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(
            f"LowRankRTRL: `{name}` must be an integer ≥ {minimum} ({meaning}), but received "
            f"{value!r}."
        )


class LowRankRTRL(AbstractAlgorithm[LowRankRTRLTrace]):
    """Low-rank RTRL: a diagonal rule's trace (`eqtrace.DRTRL` or `eqtrace.SnAp1`) plus a
    rank-`r` online correction of the influence that rule drops; `rank=0` is the base rule,
    `rank ≥ |h|` (the number of state values of the cell) is exact RTRL.

    RTRL's influence `M_t = dh_t/dθ` moves by `M_t = J_t M_{t-1} + I_t`; the influence
    `N_t` that the base rule's trace holds moves by `N_t = D_t N_{t-1} + I_t`, with `D_t` its
    per-neuron part of the state Jacobian `J_t` (and the same, exact, immediate term `I_t`).
    So the influence the base rule drops, `E_t = M_t − N_t`, moves by

    $$
    E_t = J_t E_{t-1} + (J_t − D_t)\\,N_{t-1},
    $$

    which this rule keeps in rank `r` as `E_t ≈ U_t V_tᵀ` (`U_t` `|h| × r` with orthonormal
    columns, `V_t` `|θ| × r`). With the exact update of the kept correction

    $$
    T_t = J_t U_{t-1} V_{t-1}ᵀ + (J_t − D_t)\\,N_{t-1},
    $$

    a step takes an orthonormal basis `Q` (up to `2r` columns, at most `|h|`) of the span of
    the last subspace carried forward, `J_t U_{t-1}`, and of the new term along the last
    parameter factors, `(J_t − D_t) N_{t-1} V_{t-1}`, refines it by a step of subspace
    iteration, `Q ← orth(T_t T_tᵀ Q)` (more with `iterations`), and keeps the best rank-`r`
    approximation of `T_t` within it (Rayleigh–Ritz, from the eigenvectors `Z` of the small
    Gram matrix of `T_tᵀ Q`):

    $$
    U_t = Q Z_r, \\qquad V_t = T_tᵀ Q Z_r, \\qquad E_t = U_t U_tᵀ\\,T_t,
    $$

    `Z_r` the eigenvectors of the `r` largest eigenvalues. The online gradient at step `t` is
    `(N_t + U_t V_tᵀ)ᵀ ḡ_t`.

    **Why a projection.** It is deterministic and exact where it should be: at `r = |h|` the
    columns of `U_t` are an orthonormal basis of the state, `U_t U_tᵀ = I`, and the rule is
    exact RTRL up to round-off, however the subspace was found; at `r = 0` nothing is added
    to the base rule; from a zero trace the first step is RTRL's (`E_1 = 0`). Where `2r ≥
    |h|` the basis spans the state and the step keeps the optimal rank-`r` truncation of
    `T_t` (its truncated SVD). In general the truncated SVD would need `T_t` whole: `|h|`
    products with the step and a `|h| × |h|` Gram of `N`, RTRL's compute. The subspace
    iteration needs none of it: `T_t` and `T_tᵀ` are applied through JVPs and VJPs of the
    step, `D_t` (which the base rule's linearisation gives) and products with the base trace
    (its tangent and that tangent's transpose), a few per column of `Q`. Like any greedy
    truncation, it does not promise that the error over many steps falls with `r`; measured
    on random cells it does (docs/algorithms/lowrank.md).

    **Cost.** Memory per sample: the base rule's trace plus `r (|h| + |θ|)` values (`r` is
    capped at `|h|`). Compute per step, with `p = min(2r, |h|)`: the base rule's step, one
    linearisation of the cell, `r + p` JVPs of the step and `p` VJPs per iteration plus `p`
    more, about `2p` products with the base trace per iteration plus `p + r` more
    (`O(p K |θ|)` each), and QR factorisations of `|h| × p` matrices.

    **Where it is exact.** The correction is RTRL's dropped influence for one cell: a
    `Sequential` gets one trace per cell, as under the base rule, so the paths between layers
    through later steps stay cut (credit within a step is exact); use `eqtrace.RTRL()` for a
    network as one system. The base rule must trace the cell exactly as it defines (its
    `strict` checks pass): with `strict=False` its immediate term may differ from `I_t` and
    full rank is no longer RTRL. The trace is propagated forward (`J_t U`), so a cell with a
    `jax.custom_vjp` function on its state's path is refused, as by `eqtrace.UORO`.

    Blocks of steps (`steps`, `eqtrace.make_online_block`) scan the step, with the same values
    and derivatives.

    **Arguments:**

    - `rank`: the rank `r ≥ 0` of the correction; `0` is the base rule, `r ≥ |h|` exact RTRL.
    - `base`: the diagonal rule whose trace is corrected, `eqtrace.DRTRL()` (the default) or
      `eqtrace.SnAp1()`, with its own options (`strict`, `trace_dtype`).
    - `iterations`: subspace iterations per step (`≥ 1`, default 1): more move the subspace
      closer to the dropped influence's dominant directions at `r` VJPs and JVPs each.
    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf. Off by default.
    """

    rank: int = 4
    base: AbstractWeightTraceAlgorithm = DRTRL()
    iterations: int = 1
    check_finite: bool = False
    per_layer: ClassVar[bool] = True

    def __check_init__(self):
        _check_int("rank", self.rank, 0, "the rank of the correction; 0 is the base rule")
        _check_int("iterations", self.iterations, 1, "subspace iterations per step")
        if not isinstance(self.base, AbstractWeightTraceAlgorithm):
            raise ValueError(
                "LowRankRTRL: `base` must be a diagonal rule with weight-shaped traces, "
                f"`eqtrace.DRTRL()` or `eqtrace.SnAp1()`, but received {self.base!r}."
            )

    # The base rule's structure, refusals and options.

    @property
    def strict(self) -> bool:
        """Whether the base rule refuses a cell that breaks its assumptions."""
        return self.base.strict

    def cell_structure(self, cell: AbstractCell, state: State, x: ExampleInput) -> Any:
        return self.base.cell_structure(cell, state, x)

    def with_structure(self, structure: Any) -> "LowRankRTRL":
        prepared = copy.copy(self)
        object.__setattr__(prepared, "base", self.base.with_structure(structure))
        return prepared

    def relaxed(self) -> "LowRankRTRL":
        relaxed = copy.copy(self)
        object.__setattr__(relaxed, "base", self.base.relaxed())
        return relaxed

    def cell_notes(self, cell: AbstractCell, state: State, x: ExampleInput) -> tuple[str, ...]:
        """The base rule's notes, and the rank of the correction for this cell."""
        size = flat_leaves(state).size
        rank = min(int(self.rank), size)
        line = (
            f"LowRankRTRL adds a rank-{rank} correction to {type(self.base).__name__}'s trace "
            f"(the cell has {size} state values"
        )
        line += "; at this rank it is exact RTRL)." if rank == size else ")."
        return (*self.base.cell_notes(cell, state, x), line)

    def init_cell_trace(
        self, cell: AbstractCell, state: State, x: ExampleInput
    ) -> LowRankRTRLTrace:
        # The base rule's refusals first (it refuses complex and integer state leaves).
        base = self.base.init_cell_trace(cell, state, x)
        if x is not None and self.rank > 0:
            _require_forward_mode(cell, state, x, "LowRankRTRL", "`J_t U`")
        h = flat_leaves(state).reshape(-1)
        theta, _ = real_ravel(eqx.filter(cell, eqx.is_inexact_array))
        rank = min(int(self.rank), h.size)
        dtype = jnp.result_type(h, theta)
        return LowRankRTRLTrace(
            base, jnp.zeros((h.size, rank), dtype), jnp.zeros((theta.size, rank), dtype)
        )

    def _influence(self, cell, state, base_trace, x, unravel_params):
        """`z ↦ M̂ z` for flat parameter tangents `z`, from the base rule's trace."""

        def apply(z):
            tangent = unravel_params(z)
            return flat_leaves(self.base.cell_tangent(cell, state, base_trace, x, tangent))

        return lambda z: apply(z).reshape(-1)

    def cell_step(
        self, cell: AbstractCell, state: State, trace: LowRankRTRLTrace, x: Input
    ) -> tuple[State, LowRankRTRLTrace]:
        lin, new_base = self.base.linearised_step(cell, state, trace.base, x)
        u, v = trace.state_factors, trace.param_factors
        if u.shape[1] == 0:  # rank 0: the base rule
            return lin.new_state, LowRankRTRLTrace(new_base, u, v)

        params, static = eqx.partition(cell, eqx.is_inexact_array)
        h = flat_leaves(state).reshape(-1)
        theta, unravel_params = real_ravel(params)
        shape = lin.jacobian.shape[::2]  # (K, N)

        def transition(h):  # the step on the flat state, parameters fixed
            new_state, _ = eqx.combine(params, static)(unflatten_like(state, h.reshape(shape)), x)
            return flat_leaves(new_state).reshape(-1)

        _, linear = jax.linearize(transition, h)
        transpose = jax.linear_transpose(linear, h)

        # `D_t` and its transpose, per neuron on the (K, N) layout.
        d = lin.jacobian.astype(u.dtype)
        d_t = jnp.swapaxes(d, 0, 1)

        def off(w):  # (J − D) w
            return linear(w) - mix(d, w.reshape(shape)).reshape(-1)

        def off_t(w):  # (J − D)ᵀ w
            return transpose(w)[0] - mix(d_t, w.reshape(shape)).reshape(-1)

        influence = self._influence(cell, state, trace.base, x, unravel_params)
        influence_t = jax.linear_transpose(influence, theta)

        def cols(f):  # `f` on each of the rank's columns (axis 1)
            return jax.vmap(f, in_axes=1, out_axes=1)

        propagated = cols(linear)(u)  # J U, (|h|, r)

        def apply(z):  # T z for z (|θ|, r)
            return propagated @ (v.T @ z) + cols(off)(cols(influence)(z))

        def apply_t(w):  # Tᵀ w for w (|h|, r)
            return v @ (propagated.T @ w) + cols(lambda c: influence_t(c)[0])(cols(off_t)(w))

        # The candidates: the last subspace carried forward and the new term along the
        # last parameter factors, `(J − D) M̂ V`, up to `2r` columns (at most |h|).
        rank = u.shape[1]
        candidates = jnp.concatenate([propagated, cols(off)(cols(influence)(v))], axis=1)
        basis = jnp.linalg.qr(candidates[:, : min(2 * rank, h.size)])[0]
        for _ in range(int(self.iterations)):
            basis = jnp.linalg.qr(apply(apply_t(basis)))[0]
        # Rayleigh–Ritz: the best rank-r approximation of `T` within the basis's span, from
        # the small Gram matrix of `Tᵀ basis` (its eigenvalues ascend).
        projected = apply_t(basis)
        _, rotation = jnp.linalg.eigh(projected.T @ projected)
        rotation = rotation[:, ::-1][:, :rank]
        new_u = (basis @ rotation).astype(u.dtype)
        new_v = (projected @ rotation).astype(v.dtype)
        return lin.new_state, LowRankRTRLTrace(new_base, new_u, new_v)

    def cell_tangent(
        self,
        cell: AbstractCell,
        state: State,
        trace: LowRankRTRLTrace,
        x: Input,
        params_tangent: Any,
    ) -> State:
        base = self.base.cell_tangent(cell, state, trace.base, x, params_tangent)
        if trace.state_factors.shape[1] == 0:
            return base
        delta, _ = real_ravel(params_tangent)
        correction = trace.state_factors @ (
            trace.param_factors.T @ delta.astype(trace.param_factors.dtype)
        )
        rows = flat_leaves(base) + correction.reshape(flat_leaves(base).shape)
        return unflatten_like(state, rows)
