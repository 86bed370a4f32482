"""Type aliases shared across eqtrace.

Each alias is a named `TypeAliasType`, so that `help()` and signatures show `params: Params`
instead of the expanded jaxtyping union; runtime type checkers (beartype through jaxtyping's
hook) check the aliased type as before.
"""

from typing import Any

import jax
from jaxtyping import Array, ArrayLike, Float, Inexact, Key, PyTree, Shaped, UInt32
from typing_extensions import TypeAliasType


#: A single-sample hidden state: any pytree of arrays, floating (complex included) where it is
#: differentiated; integer and boolean leaves (a step counter, a refractory count) carry no
#: derivative.
State = TypeAliasType("State", PyTree[Shaped[Array, "..."]])
#: An algorithm's eligibility trace for one sample (an `eqx.Module` per algorithm).
Trace = TypeAliasType("Trace", Any)
#: The input of one time step (usually `Float[Array, " n_in"]`; integers for an embedding).
Input = TypeAliasType("Input", PyTree[ArrayLike])
#: An example input: an input, or only its shape and dtype.
ExampleInput = TypeAliasType("ExampleInput", PyTree[ArrayLike | jax.ShapeDtypeStruct])
#: The floating (real or complex) arrays of a model: `params` in
#: `eqx.partition(model, eqx.is_inexact_array)`.
Params = TypeAliasType("Params", PyTree[Inexact[Array, "..."] | None])
Scalar = TypeAliasType("Scalar", Float[Array, ""])
#: A PRNG key given by a user. One typed key (`jax.random.key`) is expected; raw `uint32` keys
#: and batches of keys are admitted by the annotation so that eqtrace's check explains the fix.
KeyLike = TypeAliasType("KeyLike", Key[Array, "..."] | UInt32[Array, "..."])
