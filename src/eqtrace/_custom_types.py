"""Type aliases shared across eqtrace."""

from typing import Any, TypeAlias

import jax
from jaxtyping import Array, ArrayLike, Float, PyTree


#: A single-sample hidden state: any pytree of floating arrays.
State: TypeAlias = PyTree[Float[Array, "..."]]
#: An algorithm's eligibility trace for one sample (an `eqx.Module` per algorithm).
Trace: TypeAlias = Any
#: The input of one time step (usually `Float[Array, " n_in"]`; integers for an embedding).
Input: TypeAlias = PyTree[ArrayLike]
#: An example input: an input, or only its shape and dtype.
ExampleInput: TypeAlias = PyTree[ArrayLike | jax.ShapeDtypeStruct]
#: The floating arrays of a model: `params` in `eqx.partition(model, eqx.is_inexact_array)`.
Params: TypeAlias = PyTree[Float[Array, "..."] | None]
Scalar: TypeAlias = Float[Array, ""]
