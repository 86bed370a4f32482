import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._cell import AbstractCell
from .._validation import check_size
from ._linear import Linear


class MinGRUCell(AbstractCell):
    """Minimal GRU (Feng et al., 2024, "Were RNNs all we needed?").

    $$
    z = σ(W_z x + b_z),\\quad
    \\tilde h = W_h x + b_h,\\quad
    h' = (1 - z) ⊙ h + z ⊙ \\tilde h.
    $$

    The gates depend on the input only, so the recurrence is element-wise (diagonal) and
    online rules such as D-RTRL are exact for one layer. `z` and `h̃` come from one fused
    synaptic op, `input_op` (outputs stacked as `[z, h̃]`).

    **Arguments:**

    - `input_size`, `hidden_size`: sizes of the input and of the hidden state.
    - `dtype`: parameter dtype.
    - `key`: PRNG key.
    """

    input_op: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, input_size: int, hidden_size: int, *, dtype=None, key: PRNGKeyArray):
        check_size("MinGRUCell", input_size=input_size, hidden_size=hidden_size)
        self.input_op = Linear(input_size, 2 * hidden_size, dtype=dtype, key=key)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def init_state(self) -> Float[Array, " hidden"]:
        return jnp.zeros(self.hidden_size, self.input_op.weight.dtype)

    def __call__(
        self, state: Float[Array, " hidden"], x: Float[Array, " input"]
    ) -> tuple[Float[Array, " hidden"], Float[Array, " hidden"]]:
        u_z, h_tilde = jnp.split(self.input_op(x), 2)
        z = jax.nn.sigmoid(u_z)
        h = (1 - z) * state + z * h_tilde
        return h, h
