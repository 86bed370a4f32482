import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._validation import check_size


class LowRankLinear(eqx.Module):
    """A low-rank synaptic op, `u = U (V a) + b`, or with `full_rank=True` a dense op plus a
    low-rank update, `u = W a + U (V a) + b` (LoRA, Hu et al. 2021).

    Each weight of `U` (and of `W`) reaches one output, and has a weight-shaped trace; each
    weight of `V` reaches every output, so `V`'s trace holds one value per output element
    and weight: `(out, rank, in, K)` per sample under D-RTRL, SnAp-1 and e-prop. For
    LoRA-style fine-tuning, train `U` and `V` only (filter `W` out of the gradient).

    **Arguments:**

    - `in_features`, `out_features`: sizes of the input and output vectors.
    - `rank`: the inner dimension of `U (out, rank)` and `V (rank, in)`.
    - `full_rank`: whether to add the dense term `W a`.
    - `use_bias`: whether to add a bias.
    - `dtype`: parameter dtype (defaults to JAX's default float).
    - `key`: PRNG key for the uniform initialisation (`±1/√in` for `W`, `V` and the bias,
      `±1/√rank` for `U`).
    """

    weight: Float[Array, "out in"] | None
    u: Float[Array, "out rank"]
    v: Float[Array, "rank in"]
    bias: Float[Array, " out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    rank: int = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        full_rank: bool = False,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        check_size("LowRankLinear", in_features=in_features, out_features=out_features, rank=rank)
        dtype = jnp.result_type(float) if dtype is None else dtype
        wkey, ukey, vkey, bkey = jr.split(key, 4)
        lim = 1 / math.sqrt(in_features)
        shape = (out_features, in_features)
        self.weight = jr.uniform(wkey, shape, dtype, -lim, lim) if full_rank else None
        self.u = jr.uniform(ukey, (out_features, rank), dtype, -1, 1) / math.sqrt(rank)
        self.v = jr.uniform(vkey, (rank, in_features), dtype, -lim, lim)
        self.bias = jr.uniform(bkey, (out_features,), dtype, -lim, lim) if use_bias else None
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    def __call__(self, a: Float[Array, " in"]) -> Float[Array, " out"]:
        u = self.u @ (self.v @ a)
        if self.weight is not None:
            u = u + self.weight @ a
        return u if self.bias is None else u + self.bias
