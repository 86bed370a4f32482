"""The leak of the layer that reads a cell's output, read from that layer's code: what lets a
diagonal rule carry a cell's credit through a leaky read-out or a synaptic filter (`EProp`,
`eqtrace.Filtered`).

A consumer `h'_t = f(h'_{t-1}, z_t)` of a cell's output `z_t` carries a change of `z_s` into all
its later states. When its state Jacobian is a constant `κ I` (one number for every state
element, fixed by its code) and its input Jacobian `P = ∂f/∂z` does not depend on its state or
input, `dh'_t/dθ = Σ_{s≤t} κ^{t−s} P dz_s/dθ = P \\bar e_t` with `\\bar e_t = κ \\bar e_{t-1} +
dz_t/dθ`: the filter can be folded into the cell's own trace, in the space of its output, and the
consumer's exact within-step derivative `P` does the rest. Both facts are read from which
arrays the values of the two Jacobians depend on (never from sampled values); anything the
walk cannot see through counts as a dependence, which leaves the cell unfiltered.
"""

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.flatten_util import ravel_pytree

from ._cell import AbstractCell
from ._structure import _value_sources


class ConsumerLeak(NamedTuple):
    """The analysis of the layer reading a cell's output: its leak `κ`, or `None` with the
    reasons it has none (plain sentences)."""

    leak: float | None
    problems: tuple[str, ...]


def consumer_leak(layer: AbstractCell, consumer: Any) -> ConsumerLeak:
    """The constant leak `κ` of `consumer`, the layer that reads `layer`'s output, or the
    reasons it has none. Never raises."""
    if not isinstance(consumer, AbstractCell):
        what = "nothing" if consumer is None else f"a stateless {type(consumer).__name__}"
        return ConsumerLeak(None, (f"its output is read by {what}, which carries no credit on",))
    name = type(consumer).__name__
    try:
        with jax.ensure_compile_time_eval():
            return _consumer_leak(layer, consumer, name)
    except Exception as error:  # noqa: BLE001 - a consumer the analysis cannot read: no filter
        return ConsumerLeak(
            None,
            (
                f"the analysis cannot read the step of the {name} after it "
                f"({type(error).__name__}: {str(error).splitlines()[0]})",
            ),
        )


def _consumer_leak(layer: AbstractCell, consumer: AbstractCell, name: str) -> ConsumerLeak:
    x = jax.eval_shape(lambda: layer.output(layer.init_state()))
    state = jax.eval_shape(consumer.init_state)
    for tree, what in ((x, "input"), (state, "state")):
        leaves = jtu.tree_leaves(tree)
        if not leaves or not all(jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves):
            return ConsumerLeak(
                None, (f"the {name} after it has a {what} that is not all floating arrays",)
            )
    x, state = (
        jtu.tree_map(lambda a: jnp.ones(a.shape, a.dtype), tree) for tree in (x, state)
    )  # Ones keep divisions and logarithms finite; the Jacobians are checked constant.
    arrays, rest = eqx.partition(consumer, eqx.is_inexact_array)
    flat_state, unravel = ravel_pytree(state)

    def jacobians(flat_state, x, arrays, rest):
        cell = eqx.combine(arrays, rest)

        def step(flat_state, x):
            return ravel_pytree(cell(unravel(flat_state), x)[0])[0]

        return jax.jacrev(step, argnums=0)(flat_state, x), jax.jacrev(step, argnums=1)(
            flat_state, x
        )

    # The values, not only the derivatives, of both Jacobians are checked: a `stop_gradient`
    # (a detached reset) hides from a derivative what it does not hide from a value.
    leak_sources, drive_sources = _value_sources(jacobians, (flat_state, x, arrays), rest)
    num_x = len(jtu.tree_leaves(x))
    problems = []
    if leak_sources:
        problems.append(
            f"the leak ∂h_t/∂h_{{t-1}} of the {name} after it depends on its state, input or "
            "parameters (a reset, a gate, a learnt time constant or recurrent weights), so it "
            "is not a constant the cell's trace can hold"
        )
    if drive_sources & set(range(1 + num_x)):
        problems.append(
            f"the input Jacobian ∂h_t/∂z_t of the {name} after it depends on its state or "
            "input (it is not affine in its input)"
        )
    if problems:
        return ConsumerLeak(None, tuple(problems))
    # The leak depends on no array (checked): any values give it, and concrete ones keep it
    # concrete when the rule is prepared under a trace (the parameters then being tracers).
    ones = jtu.tree_map(lambda a: jnp.ones(jnp.shape(a), a.dtype), arrays)
    leak = np.asarray(jacobians(flat_state, x, ones, rest)[0])
    kappa = float(leak[0, 0]) if leak.size else float("nan")
    if not np.array_equal(leak, kappa * np.eye(leak.shape[0], dtype=leak.dtype)):
        return ConsumerLeak(
            None,
            (
                f"the leak of the {name} after it is not one number times the identity "
                "(different time constants, or state elements that mix)",
            ),
        )
    if not 0 <= kappa < 1:
        return ConsumerLeak(
            None, (f"the leak κ = {kappa} of the {name} after it is not in [0, 1)",)
        )
    return ConsumerLeak(kappa, ())
