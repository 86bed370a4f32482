import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._cell import AbstractCell
from .._validation import check_size
from ._linear import Linear
from ._rnn import _orthogonal_like


class LSTMCell(AbstractCell):
    """Long short-term memory cell with a forget gate; state `(h, c)`, output `h`.

    $$
    \\begin{aligned}
    i &= σ(W_{xi} x + b_i + W_{hi} h),\\quad
    f = σ(W_{xf} x + b_f + W_{hf} h),\\\\
    g &= \\tanh(W_{xg} x + b_g + W_{hg} h),\\quad
    o = σ(W_{xo} x + b_o + W_{ho} h),\\\\
    c' &= f ⊙ c + i ⊙ g,\\quad
    h' = o ⊙ \\tanh(c').
    \\end{aligned}
    $$

    Hochreiter & Schmidhuber (1997), with the forget gate of Gers et al. (2000). The four gates
    come from two fused synaptic ops, `input_op` (`x ↦ W_x x + b`, gates stacked as
    `[i, f, g, o]`) and `recurrent_op` (`h ↦ W_h h`, no bias); every gate is element-wise in
    their outputs, which is what the diagonal rules need. The bias is initialised to zero
    except the forget gate's, which is one (Jozefowicz et al., 2015), and the recurrent weights
    are orthogonal per gate.

    **Arguments:**

    - `input_size`, `hidden_size`: sizes of the input and of `h` and `c`.
    - `dtype`: parameter dtype.
    - `key`: PRNG key.
    """

    input_op: Linear
    recurrent_op: Linear
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, input_size: int, hidden_size: int, *, dtype=None, key: PRNGKeyArray):
        check_size("LSTMCell", input_size=input_size, hidden_size=hidden_size)
        ikey, rkey, okey = jr.split(key, 3)
        input_op = Linear(input_size, 4 * hidden_size, dtype=dtype, key=ikey)
        bias = jnp.zeros(4 * hidden_size, input_op.weight.dtype)
        bias = bias.at[hidden_size : 2 * hidden_size].set(1)
        self.input_op = eqx.tree_at(lambda o: o.bias, input_op, bias)
        recurrent = Linear(hidden_size, 4 * hidden_size, use_bias=False, dtype=dtype, key=rkey)
        self.recurrent_op = _orthogonal_like(recurrent, okey)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def init_state(self) -> tuple[Float[Array, " hidden"], Float[Array, " hidden"]]:
        zeros = jnp.zeros(self.hidden_size, self.input_op.weight.dtype)
        return zeros, zeros

    def __call__(
        self,
        state: tuple[Float[Array, " hidden"], Float[Array, " hidden"]],
        x: Float[Array, " input"],
    ) -> tuple[tuple[Float[Array, " hidden"], Float[Array, " hidden"]], Float[Array, " hidden"]]:
        h, c = state
        u_i, u_f, u_g, u_o = jnp.split(self.input_op(x) + self.recurrent_op(h), 4)
        c = jax.nn.sigmoid(u_f) * c + jax.nn.sigmoid(u_i) * jnp.tanh(u_g)
        h = jax.nn.sigmoid(u_o) * jnp.tanh(c)
        new_state = (h, c)
        return new_state, self.output(new_state)

    def output(
        self, state: tuple[Float[Array, " hidden"], Float[Array, " hidden"]]
    ) -> Float[Array, " hidden"]:
        """The hidden vector `h` of the state `(h, c)`."""
        return state[0]
