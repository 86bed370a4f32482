import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._cell import AbstractCell
from .._validation import check_size
from ._feedback import RandomFeedback
from ._linear import Linear


class LeakyReadout(AbstractCell):
    """A leaky-integrator read-out, the usual output layer of a spiking network.

    $$
    y' = κ y + (1 - κ)(W x + b),\\qquad κ = e^{-Δt/τ}.
    $$

    The state is `y` (one leaf of shape `(output_size,)`) and the output is `y` itself. It
    low-pass filters its input (e.g. spikes) with time constant `τ`, as in e-prop (Bellec et al.,
    2020). Being a cell, its weights are learnt by the online rule through a trace, which is
    exact for the element-wise recurrence `y' = κ y + …`.

    For random feedback (feedback alignment, random e-prop), wrap its op:
    `eqx.tree_at(lambda r: r.input_op, readout, eqtrace.nn.RandomFeedback(readout.input_op,
    key=key))`. Under `eqtrace.EProp`, the cell before it gets its `κ` as the filter of its
    eligibility traces.

    If you want no filtering, do not use this cell: put a plain `eqx.nn.Linear` after the last
    cell of an `eqtrace.nn.Sequential`. That is a stateless read-out, and its gradient is exact
    (ordinary backpropagation within the step), with no trace at all.

    **Arguments:**

    - `input_size`, `output_size`: sizes of the input and of the output `y`.
    - `tau`: time constant `τ`, in the same unit as `dt` (ms), a static float.
    - `dt`: time step `Δt`, a static float.
    - `dtype`: parameter dtype.
    - `key`: PRNG key.
    """

    input_op: Linear | RandomFeedback
    input_size: int = eqx.field(static=True)
    output_size: int = eqx.field(static=True)
    tau: float = eqx.field(static=True)
    dt: float = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        tau: float | int = 20.0,
        dt: float | int = 1.0,
        dtype=None,
        key: PRNGKeyArray,
    ):
        check_size("LeakyReadout", input_size=input_size, output_size=output_size)
        if not (tau > 0 and dt > 0):
            raise ValueError(
                f"LeakyReadout: `tau` and `dt` must be positive, but received tau={tau}, dt={dt}."
            )
        self.input_op = Linear(input_size, output_size, dtype=dtype, key=key)
        self.input_size = input_size
        self.output_size = output_size
        self.tau = float(tau)
        self.dt = float(dt)

    @property
    def hidden_size(self) -> int:
        """The size of the state, `output_size`."""
        return self.output_size

    @property
    def decay(self) -> float:
        """`κ = exp(−dt / τ)`."""
        return math.exp(-self.dt / self.tau)

    def init_state(self) -> Float[Array, " output"]:
        op = self.input_op.op if isinstance(self.input_op, RandomFeedback) else self.input_op
        return jnp.zeros(self.output_size, op.weight.dtype)

    def __call__(
        self, state: Float[Array, " output"], x: Float[Array, " input"]
    ) -> tuple[Float[Array, " output"], Float[Array, " output"]]:
        kappa = self.decay
        y = kappa * state + (1 - kappa) * self.input_op(x)
        return y, y
