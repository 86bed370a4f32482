import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._validation import check_size


class GroupedLinear(eqx.Module):
    """A grouped (block-diagonal) synaptic op: the input and the output are split into
    `groups` equal consecutive blocks, and block `g` of the output is a dense map of block
    `g` of the input, `u_g = W_g a_g + b_g`.

    It is the dense op whose weight matrix is masked to its diagonal blocks, held without
    the zeros: `groups` times fewer weights, and each weight still reaches one output, so the
    diagonal rules keep a weight-shaped trace, `(groups, out/groups, in/groups, K)` per
    sample.

    **Arguments:**

    - `in_features`, `out_features`: sizes of the input and output vectors, both divisible
      by `groups`.
    - `groups`: the number of blocks.
    - `use_bias`: whether to add a bias.
    - `dtype`: parameter dtype (defaults to JAX's default float).
    - `key`: PRNG key for the uniform(±1/√(in/groups)) initialisation.
    """

    weight: Float[Array, "groups out_per_group in_per_group"]
    bias: Float[Array, " out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    groups: int = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        *,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        check_size(
            "GroupedLinear", in_features=in_features, out_features=out_features, groups=groups
        )
        if in_features % groups or out_features % groups:
            raise ValueError(
                "GroupedLinear: `in_features` and `out_features` must both be divisible by "
                f"`groups`, but received in_features={in_features}, out_features="
                f"{out_features}, groups={groups}. Pick a number of groups that divides both."
            )
        dtype = jnp.result_type(float) if dtype is None else dtype
        wkey, bkey = jr.split(key)
        per_in, per_out = in_features // groups, out_features // groups
        lim = 1 / math.sqrt(per_in)
        self.weight = jr.uniform(wkey, (groups, per_out, per_in), dtype, -lim, lim)
        self.bias = jr.uniform(bkey, (out_features,), dtype, -lim, lim) if use_bias else None
        self.in_features, self.out_features, self.groups = in_features, out_features, groups

    def __call__(self, a: Float[Array, " in"]) -> Float[Array, " out"]:
        blocks = a.reshape(self.groups, -1)
        u = jnp.einsum("goi,gi->go", self.weight, blocks).reshape(self.out_features)
        return u if self.bias is None else u + self.bias
