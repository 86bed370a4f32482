import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._cell import AbstractCell
from .._validation import check_size
from ._linear import Linear


def _orthogonal_like(op: Linear, key: PRNGKeyArray) -> Linear:
    """Replaces a square recurrent weight by a random orthogonal one (stable long memory)."""
    n = op.out_features // op.in_features
    init = jax.nn.initializers.orthogonal()
    # Drawn in at least float32: the QR decomposition has no bfloat16 or float16 kernel on CPU.
    init_dtype = jnp.promote_types(op.weight.dtype, jnp.float32)
    size = (op.in_features, op.in_features)
    blocks = [init(k, size, init_dtype) for k in jr.split(key, n)]
    weight = jnp.concatenate(blocks, axis=0).astype(op.weight.dtype)
    return eqx.tree_at(lambda o: o.weight, op, weight)


class RNNCell(AbstractCell):
    """Elman recurrent cell, `h_t = tanh(W_x x_t + W_h h_{t-1} + b)`, or with a leak `α < 1`
    the leaky RNN of rate models (Murray 2019's network for RFLO),
    `h_t = (1 − α) h_{t-1} + α tanh(W_x x_t + W_h h_{t-1} + b)`.

    **Arguments:**

    - `input_size`, `hidden_size`: sizes of the input and of the hidden state.
    - `alpha`: the integration rate `α ∈ (0, 1]` (`dt/τ`); `1` (default) is the Elman cell.
    - `dtype`: parameter dtype.
    - `key`: PRNG key.
    """

    input_op: Linear
    recurrent_op: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        alpha: float | int = 1.0,
        dtype=None,
        key: PRNGKeyArray,
    ):
        check_size("RNNCell", input_size=input_size, hidden_size=hidden_size)
        if isinstance(alpha, bool) or not 0 < alpha <= 1:
            raise ValueError(
                f"RNNCell: `alpha` must lie in (0, 1] (the integration rate dt/τ; 1 is the "
                f"Elman cell), but received {alpha!r}."
            )
        ikey, rkey, okey = jr.split(key, 3)
        self.input_op = Linear(input_size, hidden_size, dtype=dtype, key=ikey)
        recurrent = Linear(hidden_size, hidden_size, use_bias=False, dtype=dtype, key=rkey)
        self.recurrent_op = _orthogonal_like(recurrent, okey)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.alpha = float(alpha)

    def init_state(self) -> Float[Array, " hidden"]:
        return jnp.zeros(self.hidden_size, self.input_op.weight.dtype)

    def __call__(
        self, state: Float[Array, " hidden"], x: Float[Array, " input"]
    ) -> tuple[Float[Array, " hidden"], Float[Array, " hidden"]]:
        h = jnp.tanh(self.input_op(x) + self.recurrent_op(state))
        if self.alpha != 1:
            # Python scalars keep the state's dtype (weak types).
            h = (1 - self.alpha) * state + self.alpha * h
        return h, h


class GRUCell(AbstractCell):
    """Gated recurrent unit with the reset gate applied after the recurrent matmul.

    $$
    \\begin{aligned}
    r &= σ(W_{xr} x + b_{xr} + W_{hr} h + b_{hr}),\\quad
    z = σ(W_{xz} x + b_{xz} + W_{hz} h + b_{hz}),\\\\
    n &= \\tanh(W_{xn} x + b_{xn} + r ⊙ (W_{hn} h + b_{hn})),\\quad
    h' = (1 - z) ⊙ n + z ⊙ h.
    \\end{aligned}
    $$

    This is the cuDNN/PyTorch form (Cho et al., 2014). Every gate is element-wise in the
    outputs of the two fused synaptic ops, which is what the diagonal rules need.

    **Arguments:**

    - `input_size`, `hidden_size`: sizes of the input and of the hidden state.
    - `dtype`: parameter dtype.
    - `key`: PRNG key.
    """

    input_op: Linear
    recurrent_op: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, input_size: int, hidden_size: int, *, dtype=None, key: PRNGKeyArray):
        check_size("GRUCell", input_size=input_size, hidden_size=hidden_size)
        ikey, rkey = jr.split(key)
        self.input_op = Linear(input_size, 3 * hidden_size, dtype=dtype, key=ikey)
        # uniform(±1/√hidden), as in PyTorch, since `Linear` scales by its input size.
        self.recurrent_op = Linear(hidden_size, 3 * hidden_size, dtype=dtype, key=rkey)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def init_state(self) -> Float[Array, " hidden"]:
        return jnp.zeros(self.hidden_size, self.input_op.weight.dtype)

    def __call__(
        self, state: Float[Array, " hidden"], x: Float[Array, " input"]
    ) -> tuple[Float[Array, " hidden"], Float[Array, " hidden"]]:
        xr, xz, xn = jnp.split(self.input_op(x), 3)
        hr, hz, hn = jnp.split(self.recurrent_op(state), 3)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1 - z) * n + z * state
        return h, h
