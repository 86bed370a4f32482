"""Type aliases shared across eqtrace."""

from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Float, PyTree


#: A single-sample hidden state: any pytree of floating arrays.
State: TypeAlias = PyTree[Float[Array, "..."]]
#: An algorithm's eligibility trace for one sample (an `eqx.Module` per algorithm).
Trace: TypeAlias = Any
#: The input of one time step (usually `Float[Array, " n_in"]`; integers for an embedding).
Input: TypeAlias = PyTree[ArrayLike]
#: The floating-point arrays of a model, as returned by `eqx.partition(model, eqx.is_inexact_array)`.
Params: TypeAlias = PyTree[Float[Array, "..."] | None]
Scalar: TypeAlias = Float[Array, ""]
