import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._cell import AbstractCell
from .._validation import check_size
from ._linear import Linear


def _normal_linear(in_features: int, out_features: int, std: float, dtype, key) -> Linear:
    op = Linear(in_features, out_features, use_bias=False, dtype=dtype, key=key)
    init_dtype = jnp.promote_types(op.weight.dtype, jnp.float32)
    weight = std * jr.normal(key, (out_features, in_features), init_dtype)
    weight = weight.astype(op.weight.dtype)
    return eqx.tree_at(lambda o: o.weight, op, weight)


class LRUCell(AbstractCell):
    """Linear recurrent unit (Orvieto et al., 2023, "Resurrecting recurrent neural networks for
    long sequences"): a diagonal complex linear recurrence.

    $$
    \\begin{aligned}
    λ &= \\exp(-e^{ν} + i\\,e^{θ}),\\qquad γ = e^{\\log γ},\\\\
    h' &= λ ⊙ h + γ ⊙ (B x),\\qquad y = \\operatorname{Re}(C h'),
    \\end{aligned}
    $$

    with `ν`, `θ`, `log γ` per-neuron parameters (shape `(hidden_size,)`) and complex matrices
    `B = B_re + i B_im`, `C = C_re + i C_im`.

    At initialisation `|λ|` is drawn uniformly on the ring `r_min ≤ |λ| ≤ r_max` of the complex
    plane (so `|λ| < 1`: the recurrence is stable), the phase `arg λ = e^θ` uniformly in
    `[0, max_phase]`, and `γ = sqrt(1 − |λ|²)` normalises the state's variance; `log γ` is then
    learnt, as in the paper. `B` and `C` are Glorot-like complex Gaussians as in the paper.

    The complex state is held as two real leaves `(h_re, h_im)` and each complex matrix as two
    real synaptic ops (`input_op_re`/`input_op_im` for `B`, `output_op_re`/`output_op_im` for
    `C`), so that `h_re' = Re(λ) h_re − Im(λ) h_im + γ B_re x` and
    `h_im' = Re(λ) h_im + Im(λ) h_re + γ B_im x` are element-wise in the ops' outputs, and
    `y = C_re h_re' − C_im h_im'`.

    The paper's skip term `D ⊙ x` is not part of the output: a cell's output must be a function of
    its new state alone, and `x` is not part of the state. Add the skip outside the cell if you
    need it.

    **Arguments:**

    - `input_size`, `hidden_size`: sizes of the input and of the (complex) state.
    - `output_size`: size of `y`; defaults to `hidden_size`.
    - `r_min`, `r_max`: the ring of `|λ|` at initialisation, `0 ≤ r_min ≤ r_max < 1`.
    - `max_phase`: the largest phase of `λ` at initialisation.
    - `dtype`: parameter dtype (real).
    - `key`: PRNG key.
    """

    input_op_re: Linear
    input_op_im: Linear
    output_op_re: Linear
    output_op_im: Linear
    nu_log: Float[Array, " hidden"]
    theta_log: Float[Array, " hidden"]
    gamma_log: Float[Array, " hidden"]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    output_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        output_size: int | None = None,
        r_min: float | int = 0.9,
        r_max: float | int = 0.999,
        max_phase: float | int = 2 * math.pi,
        dtype=None,
        key: PRNGKeyArray,
    ):
        if not 0 <= r_min <= r_max < 1:
            raise ValueError(
                "LRUCell: the initial ring of |λ| needs 0 <= r_min <= r_max < 1 for a stable "
                f"recurrence, but received r_min={r_min}, r_max={r_max}."
            )
        if not max_phase > 0:
            raise ValueError(f"LRUCell: `max_phase` must be positive, but received {max_phase}.")
        output_size = hidden_size if output_size is None else output_size
        check_size(
            "LRUCell", input_size=input_size, hidden_size=hidden_size, output_size=output_size
        )
        dtype = jnp.result_type(float) if dtype is None else dtype
        # Drawn and transformed in at least float32, then cast: in bfloat16 or float16, |λ|²
        # near 1 is too coarse (steps of 2⁻⁸ in bfloat16) for log(1 − |λ|²).
        init_dtype = jnp.promote_types(dtype, jnp.float32)
        ukey, pkey, bre, bim, cre, cim = jr.split(key, 6)
        tiny = float(jnp.finfo(init_dtype).tiny)
        u1 = jr.uniform(ukey, (hidden_size,), init_dtype)
        u2 = jr.uniform(pkey, (hidden_size,), init_dtype, minval=tiny)
        # |λ|² uniform on [r_min², r_max²): |λ| has the density of a uniform draw on the ring.
        modulus_sq = jnp.maximum(u1 * (r_max**2 - r_min**2) + r_min**2, tiny)
        self.nu_log = jnp.log(-0.5 * jnp.log(modulus_sq)).astype(dtype)
        self.theta_log = jnp.log(max_phase * u2).astype(dtype)
        self.gamma_log = (0.5 * jnp.log(1 - modulus_sq)).astype(dtype)
        b_std = 1 / math.sqrt(2 * input_size)
        c_std = 1 / math.sqrt(hidden_size)
        self.input_op_re = _normal_linear(input_size, hidden_size, b_std, dtype, bre)
        self.input_op_im = _normal_linear(input_size, hidden_size, b_std, dtype, bim)
        self.output_op_re = _normal_linear(hidden_size, output_size, c_std, dtype, cre)
        self.output_op_im = _normal_linear(hidden_size, output_size, c_std, dtype, cim)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size

    def eigenvalues(self) -> tuple[Float[Array, " hidden"], Float[Array, " hidden"]]:
        """The real and imaginary parts of the diagonal recurrence `λ`."""
        modulus = jnp.exp(-jnp.exp(self.nu_log))
        phase = jnp.exp(self.theta_log)
        return modulus * jnp.cos(phase), modulus * jnp.sin(phase)

    def init_state(self) -> tuple[Float[Array, " hidden"], Float[Array, " hidden"]]:
        zeros = jnp.zeros(self.hidden_size, self.nu_log.dtype)
        return zeros, zeros

    def __call__(
        self,
        state: tuple[Float[Array, " hidden"], Float[Array, " hidden"]],
        x: Float[Array, " input"],
    ) -> tuple[tuple[Float[Array, " hidden"], Float[Array, " hidden"]], Float[Array, " output"]]:
        h_re, h_im = state
        lam_re, lam_im = self.eigenvalues()
        gamma = jnp.exp(self.gamma_log)
        new_re = lam_re * h_re - lam_im * h_im + gamma * self.input_op_re(x)
        new_im = lam_re * h_im + lam_im * h_re + gamma * self.input_op_im(x)
        new_state = (new_re, new_im)
        return new_state, self.output(new_state)

    def output(
        self, state: tuple[Float[Array, " hidden"], Float[Array, " hidden"]]
    ) -> Float[Array, " output"]:
        """`Re(C h) = C_re h_re − C_im h_im`."""
        h_re, h_im = state
        return self.output_op_re(h_re) - self.output_op_im(h_im)
