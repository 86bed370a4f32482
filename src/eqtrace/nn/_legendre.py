import functools

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._cell import AbstractCell
from .._validation import check_size


@functools.cache
def legendre_system(order: int, window: float) -> tuple[np.ndarray, np.ndarray]:
    """`(Ā, B̄)` in float64: the Legendre delay system `θ ṁ = A m + B u` of Voelker et al.
    (2019), discretised exactly (zero-order hold) for one step of unit length.

    `A_ij = (2i + 1)·(−1 if i < j else (−1)^(i−j+1))`, `B_i = (2i + 1)(−1)^i`; then
    `Ā = exp(A/θ)` and `B̄ = A⁻¹(Ā − I)B` (A is invertible).
    """
    # Imported here: SciPy's linear algebra takes a quarter of a second to import, and only
    # this constructor needs it (every process that imports eqtrace would pay for it).
    import scipy.linalg

    i = np.arange(order)[:, None]
    j = np.arange(order)[None, :]
    a = (2 * i + 1) * np.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    b = (2 * np.arange(order) + 1) * (-1.0) ** np.arange(order)
    a_bar = scipy.linalg.expm(a / window)
    b_bar = np.linalg.solve(a, (a_bar - np.eye(order)) @ b)
    return a_bar, b_bar


class LegendreMemory(AbstractCell):
    """A fixed linear memory of the last `window` steps of the input, as the coefficients of
    its `order` first shifted Legendre polynomials (the memory of the Legendre Memory Unit,
    Voelker, Kajić and Eliasmith, 2019).

    $$
    m_t = \\bar A\\, m_{t-1} + \\bar B\\, x_t^\\top,\\quad y_t = \\operatorname{vec}(m_t),
    $$

    with `(Ā, B̄)` the delay system `θ ṁ = A m + B u` discretised exactly for unit steps (the
    input held constant over each step), one memory of `order` values per input feature. It
    recalls the input `k` steps back as `x_{t−k} ≈ Σ_i P̃_i((k + ½)/θ) m_{t,i}` for
    `0 ≤ k < θ`, with the shifted Legendre polynomials P̃_i(r) = P_i(2r − 1), more accurately
    the smoother the input is at the scale of `θ / order`. Where `DelayLine` holds the last
    `length` inputs exactly, this holds a smooth summary of a longer window in fewer values.

    It has no parameters (`Ā`, `B̄` are computed from `order` and `window`, not stored as
    arrays), so every rule runs it exactly within each step and keeps no trace for it, and
    the layer after it sees a summary of the recent past at every step. Memory: `order ×
    input_size` values of state per sample, whatever the sequence length.

    **Arguments:**

    - `input_size`: the size of one step's input.
    - `order`: how many Legendre coefficients are kept per input feature.
    - `window`: `θ`, the length in steps of the window the memory represents.
    - `dtype`: the state's dtype (default: JAX's default float).
    """

    input_size: int = eqx.field(static=True)
    order: int = eqx.field(static=True)
    window: float = eqx.field(static=True)
    dtype: jnp.dtype | None = eqx.field(static=True)

    def __init__(self, input_size: int, order: int, window: float | int, *, dtype=None):
        check_size("LegendreMemory", input_size=input_size, order=order)
        if isinstance(window, bool) or not isinstance(window, int | float) or not window > 0:
            raise ValueError(
                "LegendreMemory: `window` must be a positive number of steps, but received "
                f"{window!r}. Pass e.g. `window=16`."
            )
        self.input_size = input_size
        self.order = order
        self.window = float(window)
        self.dtype = dtype

    def init_state(self) -> Float[Array, "order input"]:
        return jnp.zeros((self.order, self.input_size), self.dtype)

    def __call__(
        self, state: Float[Array, "order input"], x: Float[Array, " input"]
    ) -> tuple[Float[Array, "order input"], Float[Array, " order*input"]]:
        a_bar, b_bar = legendre_system(self.order, self.window)
        a_bar = jnp.asarray(a_bar, state.dtype)
        b_bar = jnp.asarray(b_bar, state.dtype)
        new_state = a_bar @ state + b_bar[:, None] * x.astype(state.dtype)[None, :]
        return new_state, self.output(new_state)

    def output(self, state: Float[Array, "order input"]) -> Float[Array, " order*input"]:
        return state.reshape(-1)
