import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .._validation import check_size


class Linear(eqx.Module):
    """A dense synaptic op `u = (W ⊙ mask) a + b`, linear in its weights.

    The optional fixed boolean `mask` (shape `(out_features, in_features)`) gives sparse
    connectivity: masked weights never act and receive zero gradient. Plain `eqx.nn.Linear`
    is recognised by the online rules as well; use this one when you need a mask.

    **Arguments:**

    - `in_features`, `out_features`: sizes of the input and output vectors.
    - `use_bias`: whether to add a bias.
    - `mask`: optional boolean connectivity mask.
    - `dtype`: parameter dtype (defaults to JAX's default float).
    - `key`: PRNG key for the uniform(±1/√in) initialisation used by `eqx.nn.Linear`.
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None
    mask: Bool[Array, "out in"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        mask: Bool[Array, "out in"] | None = None,
        dtype=None,
        key: PRNGKeyArray,
    ):
        check_size("Linear", in_features=in_features, out_features=out_features)
        dtype = jnp.result_type(float) if dtype is None else dtype
        wkey, bkey = jr.split(key)
        lim = 1 / math.sqrt(in_features)
        self.weight = jr.uniform(wkey, (out_features, in_features), dtype, -lim, lim)
        self.bias = jr.uniform(bkey, (out_features,), dtype, -lim, lim) if use_bias else None
        if mask is not None:
            mask = jnp.asarray(mask, dtype=bool)
            if mask.shape != (out_features, in_features):
                raise ValueError(
                    f"Linear: `mask` must have shape (out_features, in_features) = "
                    f"{(out_features, in_features)}, but received {mask.shape}."
                )
            self.weight = jnp.where(mask, self.weight, 0)
        self.mask = mask
        self.in_features = in_features
        self.out_features = out_features

    def __call__(self, a: Float[Array, " in"]) -> Float[Array, " out"]:
        weight = self.weight if self.mask is None else jnp.where(self.mask, self.weight, 0)
        u = weight @ a
        return u if self.bias is None else u + self.bias
