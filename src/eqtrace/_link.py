"""The link: how an online rule becomes the derivative of a step (or of a block of steps).

A step returns `h_t + link(θ, x_t)`, where the link is zero in value and its JVP is the change
of `h_t` the rule attributes to a parameter tangent `δθ` (the trace applied to it), plus the
exact within-step `∂h_t/∂x_t · δx_t`. Reverse mode transposes that JVP, so `jax.grad` of a
loss on the step's output contracts the trace with `ḡ = dL/dh_t`: the online gradient. The
derivative with respect to the old state and trace is zero (no backpropagation through time).

(the design plan suggests a `custom_vjp` on the whole step; a linear JVP instead lets `jax.vmap`
turn the gradient of shared parameters into one batch-contracted product rather than
per-sample gradients summed afterwards, costs nothing in the forward pass, and makes
forward-mode differentiation of a step work too.)
"""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend import core as jcore
from jax.flatten_util import ravel_pytree

from ._custom_types import Input, State


class AbstractDerivative(eqx.Module):
    """What a link's JVP computes, for one step or for a block of steps. Holds (as arrays)
    everything the rule needs besides the cell and the input, none of it differentiated (the
    input, which may be, is the link's primal); `like` is the link's value shape (a state, or
    states stacked over a block)."""

    @property
    @abc.abstractmethod
    def like(self) -> State:
        """A pytree shaped like the link's value."""

    @abc.abstractmethod
    def of_params(self, cell: Any, x: Input, params_tangent: Any) -> State:
        """The rule's change of the state(s) for a parameter tangent (linear in it)."""

    @abc.abstractmethod
    def of_input(self, cell: Any, x: Input, x_tangent: Any) -> State:
        """The exact change of the state(s) for an input tangent (symbolic zeros as `None`)."""


class StepDerivative(AbstractDerivative):
    """One step: `ε_t · δθ` from the algorithm's `cell_tangent`, and `∂h_t/∂x_t · δx_t`."""

    algorithm: Any
    state: State  # `h_{t-1}`
    trace: Any  # `ε_t`

    @property
    def like(self) -> State:
        return self.state

    def of_params(self, cell, x, params_tangent):
        return self.algorithm.cell_tangent(cell, self.state, self.trace, x, params_tangent)

    def of_input(self, cell, x, x_tangent):
        return input_tangent(cell, self.state, x, x_tangent)


class OutputDerivative(AbstractDerivative):
    """One step's output, for a rule that defines its tangent (`cell_output_tangent`): the
    rule's change of `y_t` for `δθ`, and `∂y_t/∂x_t · δx_t` (`cell_output_input_tangent`:
    exact, unless the rule sends other credit to the layer below)."""

    algorithm: Any
    state: State  # `h_{t-1}`
    trace: Any  # `ε_t`
    output: Any  # `y_t`, for its shape

    @property
    def like(self) -> Any:
        return self.output

    def of_params(self, cell, x, params_tangent):
        return self.algorithm.cell_output_tangent(cell, self.state, self.trace, x, params_tangent)

    def of_input(self, cell, x, x_tangent):
        return self.algorithm.cell_output_input_tangent(cell, self.state, self.trace, x, x_tangent)


def output_input_tangent(cell: Any, state: State, x: Input, x_tangent: Any) -> Any:
    """The exact within-step `∂y_t/∂x_t · δx` of a cell's output: the credit to the input
    that every rule passes on, unless it defines its own (OTPE)."""
    diff_x, static_x = eqx.partition(x, eqx.is_inexact_array)
    return exact_tangent(
        lambda dx: cell.output(cell(state, eqx.combine(dx, static_x))[0]), diff_x, x_tangent
    )


def link(params: Any, x: Input, *, static: Any, derivative: AbstractDerivative) -> State:
    """Zero, shaped like `derivative.like`, with the derivative the rule defines with respect to
    `params` (the cell's floating arrays, `static` the rest) and `x` (the step's input, or the
    block's inputs)."""
    return _link(params, x, static=static, derivative=derivative)


@eqx.filter_custom_jvp
def _link(params, x, *, static, derivative):
    del params, x, static
    return zeros_like_batched(derivative.like)


@_link.def_jvp
def _link_jvp(primals, tangents, *, static, derivative):
    params, x = primals
    params_tangent, x_tangent = tangents
    zeros = zeros_like_batched(derivative.like)
    cell = eqx.combine(params, static)
    tangent = _differentiable(zeros, zeros)
    if has_tangent(params_tangent):
        of_params = derivative.of_params(cell, x, fill_tangent(params, params_tangent))
        tangent = _differentiable(zeros, of_params)
    if has_tangent(x_tangent):
        # Only computed when the input is differentiated: a first layer pays nothing for it.
        of_input = _differentiable(zeros, derivative.of_input(cell, x, x_tangent))
        tangent = jtu.tree_map(_add_tangents, tangent, of_input)
    return zeros, tangent


def _differentiable(primal: Any, tangent: Any) -> Any:
    """`tangent` with the leaves of `primal`'s integer and boolean leaves (a step counter, a
    refractory count) replaced by the only tangent JAX accepts for them, a `float0` zero:
    such leaves carry no derivative, whatever a rule computed for them. Floating leaves get
    their primal's dtype: a wider input or trace (a float64 layer below a float32 cell)
    gives a wider tangent, which JAX refuses."""

    def leaf(p, t):
        if jnp.issubdtype(p.dtype, jnp.inexact):
            return t.astype(p.dtype)
        return np.zeros(np.shape(p), jax.dtypes.float0)

    return jtu.tree_map(leaf, primal, tangent)


def _add_tangents(a: Any, b: Any) -> Any:
    return a if a.dtype == jax.dtypes.float0 else a + b


def freeze(cell: Any, *trees: Any) -> tuple[Any, Any, Any, tuple[Any, ...]]:
    """The preamble of a rule's step: the cell's parameters and the rest, a copy of the cell
    whose parameters carry no derivative, and `trees` (state, trace, input) likewise stopped —
    the link alone gives the step its derivative.

    **Returns:** `(params, static, frozen_cell, stopped_trees)`.
    """
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    frozen = eqx.combine(jax.lax.stop_gradient(params), static)
    return params, static, frozen, jax.lax.stop_gradient(trees)


def last(stacked: Any) -> Any:
    """The last entry along the leading axis of every leaf."""
    return jtu.tree_map(lambda a: a[-1], stacked)


def zeros_like_batched(tree: Any) -> Any:
    """Zeros shaped like `tree`, computed *from* it, for the value of a link.

    `jnp.zeros_like` would be a constant: under `jax.vmap` the link's value is then unbatched
    while its tangent is batched, and `jax.grad` of `jax.jit(jax.vmap(step))` fails inside JAX
    (`broadcast_in_dim broadcast_dimensions must have length equal to operand ndim`, JAX
    0.10). A `where` on the tree keeps the value batched like the tree; XLA folds it away."""
    return jtu.tree_map(lambda a: jnp.where(True, jnp.zeros((), a.dtype), a), tree)


def input_tangent(cell: Any, state: State, x: Input, x_tangent: Any) -> State:
    """The exact within-step `∂h_t/∂x_t · δx`: the credit to the input, and so to the layers
    below, that every online rule passes on unchanged."""
    diff_x, static_x = eqx.partition(x, eqx.is_inexact_array)
    return exact_tangent(lambda dx: cell(state, eqx.combine(dx, static_x))[0], diff_x, x_tangent)


def exact_tangent(fun: Any, primal: Any, tangent: Any) -> Any:
    """`fun`'s JVP at `primal` along `tangent` (symbolic zeros as `None`), in a form that
    reverse mode can transpose under `jax.vmap`.

    A JVP through a `lax.cond` (or a `while_loop`) is a cond on tangents; when a map batches its
    predicate, JAX turns it into a select between each operand and its `stop_gradient`, which
    has no transpose rule (JAX 0.10), and a `while_loop` has none at all. For a `fun` that
    branches so, the Jacobian is formed in the primal computation by forward mode (one JVP per
    input element, in one batched pass) and applied to `tangent` as a product, which
    transposes; other functions keep the plain JVP, which costs one evaluation."""
    tangent = fill_tangent(primal, tangent)
    if not _branches(fun, primal):
        return jax.jvp(fun, (primal,), (tangent,))[1]
    flat, unravel = ravel_pytree(primal)
    out_shape = jax.eval_shape(fun, primal)
    _, unravel_out = ravel_pytree(jtu.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), out_shape))

    def flat_fun(flat):
        return ravel_pytree(fun(unravel(flat)))[0]

    jacobian = jax.jacfwd(flat_fun)(flat)
    return unravel_out(jacobian @ ravel_pytree(tangent)[0].astype(jacobian.dtype))


_BRANCHING = frozenset({"cond", "while"})


def _branches(fun: Any, primal: Any) -> bool:
    """Whether the code of `fun` holds a `lax.cond` or a `while_loop` (in any sub-jaxpr)."""
    return _holds_branch(jax.make_jaxpr(fun)(primal).jaxpr)


def _holds_branch(jaxpr: Any) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _BRANCHING:
            return True
        for param in eqn.params.values():
            for inner in param if isinstance(param, tuple | list) else (param,):
                if isinstance(inner, jcore.ClosedJaxpr):
                    inner = inner.jaxpr
                if isinstance(inner, jcore.Jaxpr) and _holds_branch(inner):
                    return True
    return False


def has_tangent(tangent: Any) -> bool:
    """Whether a custom-JVP tangent holds anything but symbolic zeros (`None`)."""
    return any(t is not None for t in jtu.tree_leaves(tangent, is_leaf=_is_none))


def fill_tangent(primal: Any, tangent: Any) -> Any:
    """A custom-JVP tangent with its symbolic zeros (`None`) made explicit."""
    return jtu.tree_map(lambda p, t: jnp.zeros_like(p) if t is None else t, primal, tangent)


def _is_none(x) -> bool:
    return x is None
