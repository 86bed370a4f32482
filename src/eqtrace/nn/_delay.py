import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._cell import AbstractCell
from .._validation import check_size


class DelayLine(AbstractCell):
    """The last `length` inputs, oldest first: a causal window over the input stream.

    $$
    d_t = (x_{t-L+1}, \\dots, x_{t-1}, x_t),\\quad y_t = \\operatorname{vec}(d_t).
    $$

    A front-end that gives the next layer a local temporal receptive field, as the first
    layer of a temporal convolution does. It has no parameters, so every rule runs it exactly
    within each step and keeps no trace for it: `Sequential([DelayLine(1, 8),
    MinGRUCell(8, H), ...])` keeps D-RTRL exact (one element-wise-recurrent layer with a window
    of inputs). Memory: `length × input_size` values of state per sample.

    **Arguments:**

    - `input_size`: the size of one step's input.
    - `length`: how many steps the window holds (the newest included).
    - `dtype`: the state's dtype (default: JAX's default float).
    """

    input_size: int = eqx.field(static=True)
    length: int = eqx.field(static=True)
    dtype: jnp.dtype | None = eqx.field(static=True)

    def __init__(self, input_size: int, length: int, *, dtype=None):
        check_size("DelayLine", input_size=input_size, length=length)
        self.input_size = input_size
        self.length = length
        self.dtype = dtype

    def init_state(self) -> Float[Array, "length input"]:
        return jnp.zeros((self.length, self.input_size), self.dtype)

    def __call__(
        self, state: Float[Array, "length input"], x: Float[Array, " input"]
    ) -> tuple[Float[Array, "length input"], Float[Array, " length*input"]]:
        new_state = jnp.concatenate([state[1:], x[None].astype(state.dtype)])
        return new_state, self.output(new_state)

    def output(self, state: Float[Array, "length input"]) -> Float[Array, " length*input"]:
        return state.reshape(-1)
