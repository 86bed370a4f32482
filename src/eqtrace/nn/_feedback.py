import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._link import fill_tangent, has_tangent
from ._linear import Linear


class _Constant:
    """A fixed array held as static structure, not as a pytree leaf: no filter such as
    `eqx.is_inexact_array` selects it, so it is never a parameter, never gets a gradient and no
    optimiser updates it. Hashed by value, as static fields must be."""

    __slots__ = ("array", "_hash")

    def __init__(self, array: np.ndarray):
        array = np.array(array)
        array.flags.writeable = False
        self.array = array
        self._hash = hash((array.shape, array.dtype.str, array.tobytes()))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: Any) -> bool:
        return (
            isinstance(other, _Constant)
            and self._hash == other._hash
            and self.array.shape == other.array.shape
            and self.array.dtype == other.array.dtype
            and bool(np.array_equal(self.array, other.array))
        )

    def __repr__(self) -> str:
        return f"<fixed {self.array.dtype} array of shape {self.array.shape}>"


class RandomFeedback(eqx.Module):
    """A dense op whose backward pass to its input uses a fixed matrix `B` instead of its
    weights: feedback alignment (Lillicrap et al., *Nature Communications* 7, 13276, 2016), and
    random e-prop when it is the read-out of `eqtrace.EProp` (Bellec et al., 2020).

    The forward pass is the wrapped op's, `u = W a + b`. Its derivative is

    $$
    δu = δW\\, a + δb + B\\, δa,
    $$

    exact in the op's own parameters and with `B` in place of `W` for the input, so `jax.grad`
    (BPTT, `eqtrace.bptt_gradient`) and every online rule (which differentiate a step forward in
    its input) send `Bᵀ ḡ` to the layers below, not `Wᵀ ḡ`. Use it as a stateless read-out in an
    `eqtrace.nn.Sequential`, or as the op of an `eqtrace.nn.LeakyReadout`:
    `eqx.tree_at(lambda r: r.input_op, readout, RandomFeedback(readout.input_op, key=key))`.

    `B` is a constant, not a parameter: it is held as static structure, so
    `eqx.partition(model, eqx.is_inexact_array)` leaves it out, no gradient of it is computed
    and no optimiser changes it. (Being static, it is compiled into the program as a
    constant; a new `B` means a new compilation.)

    **Arguments:**

    - `op`: the dense op, an `eqtrace.nn.Linear` or `eqx.nn.Linear`.
    - `feedback`: the matrix `B`, of the op's weight shape `(out_features, in_features)`;
      or `None` to draw it with `key`.
    - `key`: PRNG key to draw `B` like a freshly initialised weight, uniform in
      `±1/√in_features` (the scale of `W`, so the learning signal keeps its size).
    """

    op: Linear | eqx.nn.Linear
    feedback: _Constant = eqx.field(static=True)

    def __init__(
        self,
        op: Linear | eqx.nn.Linear,
        feedback: Float[ArrayLike, "out in"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ):
        if not isinstance(op, (Linear, eqx.nn.Linear)):
            raise TypeError(
                "RandomFeedback: `op` must be an `eqtrace.nn.Linear` or `eqx.nn.Linear`, but "
                f"received a {type(op).__name__}."
            )
        shape, dtype = op.weight.shape, op.weight.dtype
        if (feedback is None) == (key is None):
            raise ValueError(
                "RandomFeedback: give exactly one of `feedback` (the matrix B) and `key` (to "
                f"draw B at random), but received {'both' if key is not None else 'neither'}."
            )
        if feedback is None:
            limit = 1 / math.sqrt(shape[1])
            feedback = jr.uniform(key, shape, dtype, -limit, limit)
        feedback = np.asarray(feedback)
        if feedback.shape != shape:
            raise ValueError(
                f"RandomFeedback: `feedback` must have the op's weight shape (out_features, "
                f"in_features) = {shape}, but received {feedback.shape}. Pass a matrix of that "
                "shape (B replaces W, not Wᵀ), or a `key` to draw one."
            )
        self.op = op
        self.feedback = _Constant(feedback.astype(dtype))

    @property
    def matrix(self) -> Float[Array, "out in"]:
        """The feedback matrix `B`."""
        return jnp.asarray(self.feedback.array)

    def __call__(self, a: Float[Array, " in"]) -> Float[Array, " out"]:
        return _feedback_call(self.op, a, feedback=self.feedback)


@eqx.filter_custom_jvp
def _feedback_call(op, a, *, feedback):
    del feedback
    return op(a)


@_feedback_call.def_jvp
def _feedback_call_jvp(primals, tangents, *, feedback):
    op, a = primals
    op_tangent, a_tangent = tangents
    params, static = eqx.partition(op, eqx.is_inexact_array)
    # Exact in the op's parameters (`δW a + δb`, through its mask if any) ...
    if has_tangent(op_tangent):
        params_tangent = fill_tangent(params, op_tangent)
    else:
        params_tangent = jax.tree_util.tree_map(jnp.zeros_like, params)
    u, tangent = jax.jvp(lambda p: eqx.combine(p, static)(a), (params,), (params_tangent,))
    if has_tangent(a_tangent):
        # ... and `B δa` for the input.
        tangent = tangent + jnp.asarray(feedback.array, u.dtype) @ a_tangent
    return u, tangent
