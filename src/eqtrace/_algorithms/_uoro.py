"""UORO: an unbiased rank-one estimate of RTRL's sensitivity, refreshed with random signs."""

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Inexact, Key

from .._algorithm import AbstractAlgorithm
from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, KeyLike, State
from .._link import AbstractDerivative, freeze, input_tangent, link
from .._structure import require_output_readout
from .._validation import check_key
from ._rtrl import flat_transition, real_ravel


class UOROTrace(eqx.Module):
    """UORO's trace: the factors of the rank-one estimate $dh/dθ ≈ \\tilde h \\tilde θ^\\top$,
    shaped like the flattened state and parameters, and the PRNG key of the next step's
    random signs."""

    state_tilde: Inexact[Array, " state"]
    params_tilde: Inexact[Array, " params"]
    key: Key[Array, ""]


def _norm(v: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.abs(v) ** 2))


class UORO(AbstractAlgorithm[UOROTrace]):
    """Unbiased online recurrent optimisation (Tallec & Ollivier, ICLR 2018).

    Approximates RTRL's sensitivity $M_t = dh_t/dθ$ by a rank-one product
    $\\tilde h_t \\tilde θ_t^\\top$ of vectors shaped like the flattened state and parameters,
    refreshed each step with fresh random signs $ν ∈ \\{±1\\}^{|h|}$:

    $$
    \\tilde h_t = ρ_0 J^h_t \\tilde h_{t-1} + ρ_1 ν, \\qquad
    \\tilde θ_t = \\tilde θ_{t-1} / ρ_0 + ν^\\top J^θ_t / ρ_1,
    $$

    with
    $ρ_0 = \\sqrt{(\\lVert\\tilde θ_{t-1}\\rVert + ε) / (\\lVert J^h_t \\tilde h_{t-1}\\rVert + ε)}$
    and $ρ_1 = \\sqrt{(\\lVert ν^\\top J^θ_t\\rVert + ε) / (\\lVert ν\\rVert + ε)}$, which
    minimise the variance that the cross terms add; $ε$ is the machine epsilon of the state's
    dtype (a guard against $0/0$ on the first step, where $\\tilde h = \\tilde θ = 0$, and for
    cells without recurrence). Since $E[ν ν^\\top] = I$, and flipping $ν$ flips every cross
    term but leaves $ρ_0, ρ_1$ unchanged, $E[\\tilde h_t \\tilde θ_t^\\top] = M_t$: the online
    gradient $\\tilde θ_t (\\tilde h_t \\cdot \\bar g_t)$ is an **unbiased** estimate of RTRL's,
    whatever the cell. It is exact only when the state has a single element.

    Each step costs one JVP ($J^h \\tilde h$) and one VJP ($ν^\\top J^θ$) of the cell, a few
    forward passes; the trace holds $|h| + |θ|$ numbers and a key per sample. A block of steps
    (`steps`, `make_online_block`) keeps no step's $\tilde θ_t$ for its derivative, which takes
    each step's $ν^\top J^θ$ again from a VJP of the cell. As for `RTRL`, a
    `Sequential`'s recurrent core (its layers up to the last cell) is one system, and stateless
    layers after it are read-outs with exact gradients.

    The trace holds the PRNG key, split every step; `init_trace` starts it from `key`.
    `eqtrace.init_state_and_trace(..., batch_size=B)` gives sample `i` the key
    `jax.random.split(key, B)[i]`, so that the samples of a batch draw independent signs; pass
    `key=` there for fresh signs for each batch of sequences.

    **Arguments:**

    - `key`: a typed PRNG key, `jax.random.key(seed)`: the seed of the random signs.
    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf. Off by default.
    """

    key: KeyLike | None = None
    check_finite: bool = False
    per_layer: ClassVar[bool] = False

    def __check_init__(self):
        check_key("UORO", "key", self.key, "`eqtrace.UORO(key=jax.random.key(0))`")

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> UOROTrace:
        # As for RTRL: checked whenever the input is known, always at `step`.
        if x is not None:
            require_output_readout("UORO", cell, state, x)
            _require_forward_mode(cell, state, x)
        h, _ = real_ravel(state)
        theta, _ = real_ravel(eqx.filter(cell, eqx.is_inexact_array))
        assert self.key is not None  # `__check_init__`
        return UOROTrace(jnp.zeros_like(h), jnp.zeros_like(theta), self.key)

    def cell_step(
        self, cell: AbstractCell, state: State, trace: UOROTrace, x: Input
    ) -> tuple[State, UOROTrace]:
        new_state, new_trace, _ = self._advance(cell, state, trace, x)
        return new_state, new_trace

    def _advance(
        self, cell: AbstractCell, state: State, trace: UOROTrace, x: Input
    ) -> tuple[State, UOROTrace, tuple[Array, Array, Array]]:
        """One step, and its `(ρ_0, ρ_1, ν)`, which a block's derivative reads."""
        transition, h, theta, unravel_state, _ = flat_transition(cell, state, x)
        new_h, linear = jax.linearize(transition, h, theta)
        key, signs_key = jr.split(trace.key)
        signs = jr.rademacher(signs_key, h.shape, jnp.int8).astype(h.dtype)
        # J^h h̃ (one JVP) and νᵀ J^θ (one VJP); no |θ|-sized Jacobian.
        propagated = linear(trace.state_tilde, jnp.zeros_like(theta))
        signs_theta = jax.linear_transpose(linear, h, theta)(signs)[1]
        eps = jnp.finfo(h.dtype).eps
        rho0 = jnp.sqrt((_norm(trace.params_tilde) + eps) / (_norm(propagated) + eps))
        rho1 = jnp.sqrt((_norm(signs_theta) + eps) / (_norm(signs) + eps))
        state_tilde = rho0 * propagated + rho1 * signs
        params_tilde = trace.params_tilde / rho0 + signs_theta / rho1
        new_trace = UOROTrace(state_tilde.astype(h.dtype), params_tilde.astype(theta.dtype), key)
        return unravel_state(new_h), new_trace, (rho0, rho1, signs)

    def cell_tangent(
        self, cell: AbstractCell, state: State, trace: UOROTrace, x: Input, params_tangent: Any
    ) -> State:
        del cell, x
        _, unravel_state = real_ravel(state)
        delta, _ = real_ravel(params_tangent)
        return unravel_state(trace.state_tilde * jnp.dot(trace.params_tilde, delta))

    def cell_steps(
        self, cell: AbstractCell, state: State, trace: UOROTrace, xs: Input
    ) -> tuple[State, UOROTrace]:
        """`C` steps with the values of `C` single steps; the derivative keeps no step's `θ̃ₜ`.

        The forward pass forms `θ̃` at every step, as stepping does: `ρ_0` of step `t` divides
        by `‖θ̃_{t-1}‖`, which depends on every earlier term of the block. What a block saves is
        the derivative. The rule's change of `h_t` for a parameter tangent `δθ` is
        `h̃ₜ (θ̃ₜ · δθ)`, and the scalar `s_t = θ̃ₜ · δθ` follows
        `s_t = s_{t-1} / ρ_0 + (ν_tᵀ J^θ_t) · δθ / ρ_1` from `s_0 = θ̃₀ · δθ`. The row
        `ν_tᵀ J^θ_t` is a VJP of the cell (never a transposed JVP, which JAX cannot do through
        a `lax.cond` batched over the steps), recomputed per step when the recursion is
        transposed: reverse mode gives `a_0 θ̃₀ + Σ_t (a_t / ρ_1) ν_tᵀ J^θ_t`, the weights
        `a_t` from a scalar recursion backwards over the block, with one `|θ|`-sized sum
        carried. A block keeps `h_{t-1}`, `h̃ₜ`, `ν_t` (`3 |h|`) and `ρ_0, ρ_1` per step and
        `θ̃₀` once, where the default block keeps every step's `θ̃ₜ` (`C |θ|`).
        """
        params, static, frozen, (state, trace, stopped_xs) = freeze(cell, state, trace, xs)

        def body(carry, x):
            new_state, new_trace, (rho0, rho1, signs) = self._advance(frozen, *carry, x)
            record = (carry[0], new_state, new_trace.state_tilde, rho0, rho1, signs)
            return (new_state, new_trace), record

        (_, last_trace), (previous, states, tildes, rho0, rho1, signs) = jax.lax.scan(
            body, (state, trace), stopped_xs
        )
        states, last_trace = self.checked(states, last_trace)
        derivative = _UOROBlockDerivative(
            params_tilde=trace.params_tilde,
            previous=previous,
            states=states,
            state_tildes=tildes,
            rho0=rho0,
            rho1=rho1,
            signs=signs,
        )
        links = link(params, xs, static=static, derivative=derivative)
        return jtu.tree_map(jnp.add, states, links), last_trace


class _UOROBlockDerivative(AbstractDerivative):
    """A block's derivative as UORO defines it (`UORO.cell_steps`), and the exact
    `∂h_t/∂x_t · δx_t`."""

    params_tilde: Array  # `θ̃_0`, before the block
    previous: State  # `h_0 … h_{C-1}`, stacked
    states: State  # `h_1 … h_C`, stacked
    state_tildes: Array  # `h̃_1 … h̃_C`
    rho0: Array  # `(C,)`
    rho1: Array  # `(C,)`
    signs: Array  # `ν_1 … ν_C`

    @property
    def like(self) -> State:
        return self.states

    def of_params(self, cell, xs, params_tangent):
        delta, _ = real_ravel(params_tangent)
        params, static = eqx.partition(cell, eqx.is_inexact_array)
        theta, unravel_params = real_ravel(params)

        # One step of the recursion. Checkpointed: JAX keeps only its inputs (the stacked
        # `h_{t-1}`, `x_t`, `ν_t`), not the row `ν_tᵀ J^θ_t` of every step, and forms the row
        # again (one VJP) where it transposes the step.
        @jax.checkpoint
        def recursion(s, delta, theta, h, x, signs, rho0, rho1):
            cell = eqx.combine(unravel_params(theta), static)
            transition, h, theta, _, _ = flat_transition(cell, h, x)
            row = jax.vjp(lambda t: transition(h, t), theta)[1](signs)[0]
            return s / rho0 + jnp.dot(row, delta.astype(row.dtype)) / rho1

        def body(s, inputs):
            s = recursion(s, delta, theta, *inputs)
            return s, s

        start = jnp.dot(self.params_tilde, delta.astype(self.params_tilde.dtype))
        inputs = (self.previous, xs, self.signs, self.rho0, self.rho1)
        _, scalars = jax.lax.scan(body, start.astype(self.rho0.dtype), inputs)
        changes = self.state_tildes * scalars[:, None].astype(self.state_tildes.dtype)
        unravel = real_ravel(jtu.tree_map(lambda a: a[0], self.states))[1]
        return jax.vmap(unravel)(changes)

    def of_input(self, cell, xs, xs_tangent):
        return jax.vmap(lambda h, x, t: input_tangent(cell, h, x, t))(self.previous, xs, xs_tangent)


def _require_forward_mode(
    cell: AbstractCell, state: State, x: Any, rule: str = "UORO", product: str = "`J^h h̃`"
) -> None:
    """Refuses a cell that JAX cannot push a tangent forward through (a `jax.custom_vjp`
    function on the state's path): UORO's `J^h h̃` (and `LowRankRTRL`'s `J U`) is a
    forward-mode product. Found by lowering that product for the cell's shapes, which computes
    nothing."""

    def lowers() -> bool:
        arrays, static = eqx.partition((cell, state, x), eqx.is_array)

        def forward(arrays):
            cell, state, x = eqx.combine(arrays, static)
            transition, h, theta, _, _ = flat_transition(cell, state, x)
            return jax.jvp(lambda h: transition(h, theta), (h,), (h,))[1]

        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arrays)
        try:
            jax.jit(forward).lower(shapes)
        except TypeError as error:
            if "custom_vjp" not in str(error):
                raise
            return False
        return True

    if not lowers():
        raise ValueError(
            f"{rule} cannot run {type(cell).__name__}: its state goes through a `jax.custom_vjp` "
            f"function, which JAX cannot differentiate in forward mode, and {rule} propagates its "
            f"trace forward ({product}). Define the function with `jax.custom_jvp` instead (as "
            "`eqtrace.nn.surrogate` does for spikes), or use `eqtrace.RTRL()` or a diagonal rule."
        )
