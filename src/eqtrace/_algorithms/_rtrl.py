"""Exact RTRL: the full sensitivity of the state to the parameters."""

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from .._algorithm import AbstractAlgorithm
from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._structure import require_output_readout


class RTRLTrace(eqx.Module):
    """The exact sensitivity `M = dh/dθ` of the flattened state to the flattened parameters."""

    jacobian: Float[Array, "state params"]


def real_ravel(tree: Any) -> tuple[Array, Callable[[Array], Any]]:
    """`tree` as one real vector, each complex leaf as its real and imaginary parts, and the
    inverse map. Complex states and parameters (an LRU's) then have real Jacobians: a complex
    matrix could hold only the complex-linear part of a derivative, and the state of a complex
    cell with real parameters (or `conj`, `abs` of its state) is not complex-linear in them."""

    def split(a):
        return jnp.stack([jnp.real(a), jnp.imag(a)], -1) if jnp.iscomplexobj(a) else a

    flat, unravel_parts = ravel_pytree(jtu.tree_map(split, tree))

    def unravel(vector):
        def join(parts, like):
            if jnp.iscomplexobj(like):
                return jax.lax.complex(parts[..., 0], parts[..., 1]).astype(like.dtype)
            return parts

        return jtu.tree_map(join, unravel_parts(vector), tree)

    return flat, unravel


def flat_transition(cell: AbstractCell, state: State, x: Input):
    """The cell's state transition as a function of flat real vectors `(h, θ) -> h'`."""
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    h, unravel_state = real_ravel(state)
    theta, unravel_params = real_ravel(params)

    def transition(h, theta):
        new_state, _ = eqx.combine(unravel_params(theta), static)(unravel_state(h), x)
        return real_ravel(new_state)[0]

    return transition, h, theta, unravel_state, unravel_params


class RTRL(AbstractAlgorithm[RTRLTrace]):
    """Exact real-time recurrent learning (Williams & Zipser, 1989).

    Carries the full sensitivity `M_t = dh_t/dθ` and updates it with
    `M_t = J^h_t M_{t-1} + J^θ_t`, where `J^h_t = ∂h_t/∂h_{t-1}` and `J^θ_t = ∂h_t/∂θ`. The
    online gradient of a loss at step `t` is `M_tᵀ ḡ_t`; summed over steps it equals the BPTT
    gradient of the summed loss exactly.

    A `Sequential` is treated as one recurrent system (its layers up to the last cell), so the
    gradient stays exact across layers; stateless layers after the last cell are read-outs with
    exact gradients.

    Memory is `O(|h|·|θ|)` and compute `O(|h|·|θ|)` forward passes' worth per step: a tool for
    small models and for checking other rules, not for training large networks.

    **Arguments:**

    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf. Off by default.
    """

    check_finite: bool = False
    per_layer: ClassVar[bool] = False

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> RTRLTrace:
        # Checked whenever the input is known: always at `step`, which checks its trace
        # against `init_trace` with the step's input.
        if x is not None:
            require_output_readout("RTRL", cell, state, x)
        params = eqx.filter(cell, eqx.is_inexact_array)
        h, _ = real_ravel(state)
        theta, _ = real_ravel(params)
        return RTRLTrace(jnp.zeros((h.size, theta.size), jnp.result_type(h, theta)))

    def cell_step(
        self, cell: AbstractCell, state: State, trace: RTRLTrace, x: Input
    ) -> tuple[State, RTRLTrace]:
        transition, h, theta, unravel_state, _ = flat_transition(cell, state, x)
        new_h, linear = jax.linearize(transition, h, theta)
        # The rows of J^h and J^θ: one VJP per state element (|h| ≪ |θ|), then J^h M as a
        # product. Reverse mode only, so that a cell with a `jax.custom_vjp` function (which
        # JAX cannot push tangents forward through) runs, as it does under the other rules.
        transpose = jax.linear_transpose(linear, h, theta)
        jac_state, immediate = jax.vmap(transpose)(jnp.eye(new_h.size, dtype=new_h.dtype))
        propagated = jac_state @ trace.jacobian
        return unravel_state(new_h), RTRLTrace(propagated + immediate)

    def cell_tangent(
        self, cell: AbstractCell, state: State, trace: RTRLTrace, x: Input, params_tangent: Any
    ) -> State:
        del cell, x
        _, unravel_state = real_ravel(state)
        delta, _ = real_ravel(params_tangent)
        return unravel_state(trace.jacobian @ delta)
