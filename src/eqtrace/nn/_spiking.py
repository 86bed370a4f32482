import abc
import math
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .._cell import AbstractCell
from .._validation import check_size
from ._linear import Linear
from ._surrogate import AbstractSurrogate, FastSigmoid


_SpikingState = tuple[Float[Array, " hidden"], ...]


class AbstractSpikingCell(AbstractCell):
    """A cell of spiking neurons: an [`eqtrace.AbstractCell`][] that says where its spikes are.

    Besides the methods of every cell, a spiking cell implements `spikes(state)`, the spikes of
    one sample's state, and has a time step `dt` in milliseconds. This is what
    [`eqtrace.nn.spikes`][], [`eqtrace.nn.firing_rates`][] and [`eqtrace.tasks.evaluate`][]
    read, so that they need not know how each cell stores its spikes ([`eqtrace.nn.LIF`][]
    computes them from the membrane potential, [`eqtrace.nn.ALIF`][] keeps them as the last
    leaf of its state). A cell of your own declares its spikes the same way:

    ```python
    class MyNeuron(eqtrace.nn.AbstractSpikingCell):
        ...
        dt: float = eqx.field(static=True)  # ms

        def spikes(self, state):
            return state[1]
    ```
    """

    dt: eqx.AbstractVar[float]

    @abc.abstractmethod
    def spikes(self, state: Any) -> Float[Array, " hidden"]:
        """The spikes of `state`, one sample's state: one value per neuron, 1 where the
        neuron fires and 0 elsewhere (in the forward pass; a surrogate gradient may flow
        through it)."""


def _check_positive(cls: str, **values: float | int) -> None:
    for name, value in values.items():
        # `inf` is refused too: an infinite threshold never fires, and an infinite time
        # constant or step turns the decays into NaN.
        if not 0 < value < math.inf:
            raise ValueError(f"{cls}: `{name}` must be a positive float, but received {value}.")


def _make_ops(
    cls, input_size, hidden_size, recurrent, input_mask, recurrent_mask, dtype, key
) -> tuple[Linear, Linear | None]:
    if recurrent_mask is not None and not recurrent:
        raise ValueError(
            f"{cls}: `recurrent_mask` was given but `recurrent=False`; pass `recurrent=True` for "
            "recurrent connections, or drop the mask."
        )
    check_size(cls, input_size=input_size, hidden_size=hidden_size)
    ikey, rkey = jr.split(key)
    input_op = Linear(
        input_size, hidden_size, use_bias=False, mask=input_mask, dtype=dtype, key=ikey
    )
    recurrent_op = (
        Linear(hidden_size, hidden_size, use_bias=False, mask=recurrent_mask, dtype=dtype, key=rkey)
        if recurrent
        else None
    )
    return input_op, recurrent_op


def _log_tau(
    learn: bool, tau: float | int, hidden_size: int, dtype
) -> Float[Array, " hidden"] | None:
    if not learn:
        return None
    dtype = jnp.result_type(float) if dtype is None else dtype
    return jnp.full(hidden_size, math.log(tau), dtype)


def _decay(log_tau: Array | None, tau: float, dt: float) -> float | Array:
    """`exp(−dt / τ)`: a static float, or per neuron when `τ = exp(log_tau)` is learnt."""
    if log_tau is None:
        return math.exp(-dt / tau)
    return jnp.exp(-dt * jnp.exp(-log_tau))


def _synaptic_input(cell, s: Array, x: Array) -> Array:
    u = cell.input_op(x)
    if cell.recurrent_op is not None:
        u = u + cell.recurrent_op(s)
    return u


def _membrane(cell, v: Array, s: Array, current: Array, detach_reset: bool = False) -> Array:
    """Leak, reset with the previous step's spikes `s`, and integrate `current`; with
    `detach_reset`, the reset carries no derivative (the spikes are constants in it)."""
    alpha = _decay(cell.log_tau_mem, cell.tau_mem, cell.dt)
    if detach_reset:
        s = jax.lax.stop_gradient(s)
    if cell.reset == "subtract":
        return alpha * v - cell.threshold * s + current
    return alpha * (1 - s) * v + current


class LIF(AbstractSpikingCell):
    """Leaky integrate-and-fire neurons in discrete time, optionally recurrent and with a
    current-based synapse (Bellec et al., 2020, "A solution to the learning dilemma for
    recurrent networks of spiking neurons").

    With `α = exp(−Δt/τ_mem)`, `α_s = exp(−Δt/τ_syn)`, threshold `ϑ` and surrogate `H`:

    $$
    \\begin{aligned}
    u_t &= W_{in} x_t + W_{rec} s_{t-1} \\quad(\\text{no } W_{rec} \\text{ unless recurrent}),\\\\
    i_t &= α_s i_{t-1} + u_t \\quad(\\text{with a synapse; otherwise } i_t = u_t),\\\\
    v_t &= α v_{t-1} - ϑ s_{t-1} + i_t \\quad(\\text{reset="subtract"}),\\qquad
    v_t = α (1 - s_{t-1}) v_{t-1} + i_t \\quad(\\text{reset="zero"}),\\\\
    s_t &= H\\big((v_t - ϑ) / ϑ\\big).
    \\end{aligned}
    $$

    The reset uses the spike of the *previous* step, as in e-prop: the stored `v_t` is the
    membrane before its own reset, and a spike `s_t` resets the membrane at step `t + 1`. The
    surrogate sees the distance to threshold in units of the threshold, `(v − ϑ)/ϑ`, so its
    width is relative to `ϑ` (Bellec et al.); the forward pass is exactly `s_t = [v_t > ϑ]`.
    The reset is differentiated like everything else, unless `detach_reset=True`: then the
    spikes in the reset term carry no derivative (`stop_gradient`), as in Xiao et al. (2022,
    OTTT), and with `reset="subtract"` the membrane's derivative in its previous value is the
    constant leak `α`, which `eqtrace.OTTT` needs. The forward pass is the same either way.

    The state is the tuple `(v,)`, or `(v, i)` with a synapse, every leaf of shape
    `(hidden_size,)`; the output is the spikes `s = spikes(state)`, computed from `v`. (The
    spikes need no state leaf of their own: `s_t` is a fixed function of `v_t`, and an extra
    leaf would cost the online rules a third more trace for no information. `ALIF` keeps one
    because its spike function has a learnable parameter, `β`.) The weights are synaptic ops
    (`input_op`, and `recurrent_op` acting on the previous spikes), optionally masked for sparse
    connectivity; everything else is element-wise per neuron. With `learn_tau=True` the time
    constants are per-neuron parameters `log_tau_mem` (and `log_tau_syn`), `τ = exp(log τ)`;
    otherwise they are static floats.

    **Arguments:**

    - `input_size`, `hidden_size`: number of inputs and of neurons.
    - `recurrent`: whether neurons receive the previous step's spikes through `W_rec`.
    - `synapse`: whether the input current is low-pass filtered by a synapse (`τ_syn`).
    - `reset`: `"subtract"` (subtract `ϑ`) or `"zero"` (set the membrane to zero).
    - `threshold`: the firing threshold `ϑ > 0`.
    - `tau_mem`, `tau_syn`: time constants, in the unit of `dt` (ms).
    - `dt`: the time step.
    - `learn_tau`: whether the time constants are learnt, one per neuron.
    - `surrogate`: the surrogate spike function, an
      [`eqtrace.nn.surrogate.AbstractSurrogate`][] (default `FastSigmoid(10.0)`, SuperSpike).
    - `input_mask`, `recurrent_mask`: optional boolean connectivity masks of shapes
      `(hidden_size, input_size)` and `(hidden_size, hidden_size)`.
    - `detach_reset`: give the reset no derivative (default `False`).
    - `dtype`: parameter and state dtype.
    - `key`: PRNG key.
    """

    input_op: Linear
    recurrent_op: Linear | None
    log_tau_mem: Float[Array, " hidden"] | None
    log_tau_syn: Float[Array, " hidden"] | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    synapse: bool = eqx.field(static=True)
    reset: Literal["subtract", "zero"] = eqx.field(static=True)
    threshold: float = eqx.field(static=True)
    tau_mem: float = eqx.field(static=True)
    tau_syn: float = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    surrogate: AbstractSurrogate = eqx.field(static=True)
    detach_reset: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        recurrent: bool = False,
        synapse: bool = False,
        reset: Literal["subtract", "zero"] = "subtract",
        threshold: float | int = 1.0,
        tau_mem: float | int = 20.0,
        tau_syn: float | int = 5.0,
        dt: float | int = 1.0,
        learn_tau: bool = False,
        surrogate: AbstractSurrogate = FastSigmoid(),
        input_mask: Bool[Array, "hidden input"] | None = None,
        recurrent_mask: Bool[Array, "hidden hidden"] | None = None,
        detach_reset: bool = False,
        dtype=None,
        key: PRNGKeyArray,
    ):
        _check_positive("LIF", threshold=threshold, tau_mem=tau_mem, tau_syn=tau_syn, dt=dt)
        self.input_op, self.recurrent_op = _make_ops(
            "LIF", input_size, hidden_size, recurrent, input_mask, recurrent_mask, dtype, key
        )
        self.log_tau_mem = _log_tau(learn_tau, tau_mem, hidden_size, dtype)
        self.log_tau_syn = _log_tau(learn_tau and synapse, tau_syn, hidden_size, dtype)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.synapse = synapse
        self.reset = reset
        self.threshold = float(threshold)
        self.tau_mem = float(tau_mem)
        self.tau_syn = float(tau_syn)
        self.dt = float(dt)
        self.surrogate = surrogate
        self.detach_reset = bool(detach_reset)

    def __check_init__(self):
        if self.reset not in ("subtract", "zero"):
            raise ValueError(
                f'LIF: `reset` must be "subtract" or "zero", but received {self.reset!r}.'
            )

    def init_state(self) -> _SpikingState:
        zeros = jnp.zeros(self.hidden_size, self.input_op.weight.dtype)
        return (zeros, zeros) if self.synapse else (zeros,)

    def __call__(
        self, state: _SpikingState, x: Float[Array, " input"]
    ) -> tuple[_SpikingState, Float[Array, " hidden"]]:
        s = self.spikes(state)  # the previous step's spikes
        v, i = state if self.synapse else (state[0], None)
        current = _synaptic_input(self, s, x)
        if i is not None:
            i = _decay(self.log_tau_syn, self.tau_syn, self.dt) * i + current
            current = i
        v = _membrane(self, v, s, current, self.detach_reset)
        new_state = (v,) if i is None else (v, i)
        return new_state, self.output(new_state)

    def spikes(self, state: _SpikingState) -> Float[Array, " hidden"]:
        """The spikes `s = H((v − ϑ)/ϑ)` of the state."""
        return self.surrogate((state[0] - self.threshold) / self.threshold)

    def output(self, state: _SpikingState) -> Float[Array, " hidden"]:
        """The spikes of the state, `spikes(state)`."""
        return self.spikes(state)


class ALIF(AbstractSpikingCell):
    """Adaptive leaky integrate-and-fire neurons (Bellec et al., 2018, "Long short-term memory
    and learning-to-learn in networks of spiking neurons"; in the form of Bellec et al., 2020).

    As [`eqtrace.nn.LIF`][] (same input, synapse and reset), with a threshold that rises after
    each spike and relaxes with time constant `τ_adapt`, `ρ = exp(−Δt/τ_adapt)`:

    $$
    \\begin{aligned}
    a_t &= ρ a_{t-1} + s_{t-1},\\qquad A_t = ϑ + β a_t,\\\\
    v_t &= α v_{t-1} - ϑ s_{t-1} + i_t \\quad(\\text{or } α (1 - s_{t-1}) v_{t-1} + i_t),\\\\
    s_t &= H\\big((v_t - A_t) / ϑ\\big).
    \\end{aligned}
    $$

    The reset subtracts the base threshold `ϑ`, as in the paper. The state is `(v, a, s)`, or
    `(v, i, a, s)` with a synapse; the output is `s`. With `learn_tau=True` every time constant
    (`log_tau_mem`, `log_tau_adapt`, and `log_tau_syn` with a synapse) is a per-neuron parameter;
    with `learn_beta=True` so is `β` (`beta_per_neuron`). Otherwise they are static floats.

    **Arguments:**

    As for [`eqtrace.nn.LIF`][], and:

    - `tau_adapt`: time constant of the threshold adaptation (ms).
    - `beta`: strength `β ≥ 0` of the adaptation.
    - `learn_beta`: whether `β` is learnt, one per neuron.
    """

    input_op: Linear
    recurrent_op: Linear | None
    log_tau_mem: Float[Array, " hidden"] | None
    log_tau_syn: Float[Array, " hidden"] | None
    log_tau_adapt: Float[Array, " hidden"] | None
    beta_per_neuron: Float[Array, " hidden"] | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    synapse: bool = eqx.field(static=True)
    reset: Literal["subtract", "zero"] = eqx.field(static=True)
    threshold: float = eqx.field(static=True)
    tau_mem: float = eqx.field(static=True)
    tau_syn: float = eqx.field(static=True)
    tau_adapt: float = eqx.field(static=True)
    beta: float = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    surrogate: AbstractSurrogate = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        recurrent: bool = False,
        synapse: bool = False,
        reset: Literal["subtract", "zero"] = "subtract",
        threshold: float | int = 1.0,
        tau_mem: float | int = 20.0,
        tau_syn: float | int = 5.0,
        tau_adapt: float | int = 200.0,
        beta: float | int = 0.07,
        dt: float | int = 1.0,
        learn_tau: bool = False,
        learn_beta: bool = False,
        surrogate: AbstractSurrogate = FastSigmoid(),
        input_mask: Bool[Array, "hidden input"] | None = None,
        recurrent_mask: Bool[Array, "hidden hidden"] | None = None,
        dtype=None,
        key: PRNGKeyArray,
    ):
        _check_positive(
            "ALIF",
            threshold=threshold,
            tau_mem=tau_mem,
            tau_syn=tau_syn,
            tau_adapt=tau_adapt,
            dt=dt,
        )
        if not beta >= 0:
            raise ValueError(f"ALIF: `beta` must be non-negative, but received {beta}.")
        self.input_op, self.recurrent_op = _make_ops(
            "ALIF", input_size, hidden_size, recurrent, input_mask, recurrent_mask, dtype, key
        )
        self.log_tau_mem = _log_tau(learn_tau, tau_mem, hidden_size, dtype)
        self.log_tau_syn = _log_tau(learn_tau and synapse, tau_syn, hidden_size, dtype)
        self.log_tau_adapt = _log_tau(learn_tau, tau_adapt, hidden_size, dtype)
        self.beta_per_neuron = (
            jnp.full(hidden_size, beta, self.input_op.weight.dtype) if learn_beta else None
        )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.synapse = synapse
        self.reset = reset
        self.threshold = float(threshold)
        self.tau_mem = float(tau_mem)
        self.tau_syn = float(tau_syn)
        self.tau_adapt = float(tau_adapt)
        self.beta = float(beta)
        self.dt = float(dt)
        self.surrogate = surrogate

    def __check_init__(self):
        if self.reset not in ("subtract", "zero"):
            raise ValueError(
                f'ALIF: `reset` must be "subtract" or "zero", but received {self.reset!r}.'
            )

    def init_state(self) -> _SpikingState:
        zeros = jnp.zeros(self.hidden_size, self.input_op.weight.dtype)
        return (zeros, zeros, zeros, zeros) if self.synapse else (zeros, zeros, zeros)

    def adaptive_threshold(self, state: _SpikingState) -> Float[Array, " hidden"]:
        """The threshold `A_t = ϑ + β a_t` of the state."""
        a = state[-2]
        beta = self.beta if self.beta_per_neuron is None else self.beta_per_neuron
        return self.threshold + beta * a

    def __call__(
        self, state: _SpikingState, x: Float[Array, " input"]
    ) -> tuple[_SpikingState, Float[Array, " hidden"]]:
        if self.synapse:
            v, i, a, s = state
        else:
            (v, a, s), i = state, None
        current = _synaptic_input(self, s, x)
        if i is not None:
            i = _decay(self.log_tau_syn, self.tau_syn, self.dt) * i + current
            current = i
        a = _decay(self.log_tau_adapt, self.tau_adapt, self.dt) * a + s
        v = _membrane(self, v, s, current)
        beta = self.beta if self.beta_per_neuron is None else self.beta_per_neuron
        s = self.surrogate((v - self.threshold - beta * a) / self.threshold)
        new_state = (v, a, s) if i is None else (v, i, a, s)
        return new_state, self.output(new_state)

    def spikes(self, state: _SpikingState) -> Float[Array, " hidden"]:
        """The spikes `s`, the last leaf of the state."""
        return state[-1]

    def output(self, state: _SpikingState) -> Float[Array, " hidden"]:
        """The spikes of the state, `spikes(state)`."""
        return self.spikes(state)
