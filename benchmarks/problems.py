"""The benchmark problems: a network, its parameters and a stream of data, per `--model`."""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import eqtrace


MODELS = ("gru", "lif")
# Per-model defaults: (input, hidden, batch, steps).
DEFAULTS = {"gru": (32, 128, 32, 200), "lif": (100, 256, 32, 1000)}
POOL = 64  # distinct steps of data; step t reads entry t % POOL


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark configuration: the problem's sizes and the algorithms' hyperparameters."""

    model: str = "gru"
    input: int = 32
    hidden: int = 128
    batch: int = 32
    steps: int = 200
    rank: float = 4.0
    block: int = 50
    # RTRL is skipped when its batched trace, batch·|h|·|θ| numbers, exceeds this.
    rtrl_limit: float = 1e7
    seed: int = 0
    # The LIF layer of the "lif" model: its reset detached from the gradient (which OTTT
    # needs), and without recurrent weights (which OTPE needs).
    detach_reset: bool = False
    feedforward: bool = False

    def args(self) -> list[str]:
        """The command-line flags that rebuild this configuration (for the subprocesses)."""
        return [
            *("--model", self.model, "--input", str(self.input), "--hidden", str(self.hidden)),
            *("--batch", str(self.batch), "--steps", str(self.steps), "--rank", str(self.rank)),
            *("--block", str(self.block)),
            *("--rtrl-limit", str(self.rtrl_limit), "--seed", str(self.seed)),
            *(["--detach-reset"] if self.detach_reset else []),
            *(["--feedforward"] if self.feedforward else []),
        ]

    def describe(self) -> str:
        flags = " detach_reset" * self.detach_reset + " feedforward" * self.feedforward
        return (
            f"model={self.model}{flags} input={self.input} hidden={self.hidden} "
            f"batch={self.batch} steps={self.steps}"
        )


class Stream(eqx.Module):
    """The data of step `t`: entry `t % POOL` of small pools of inputs and targets.

    Memory stays constant in the sequence length (no `(T, batch, input)` tensor), and `x_t` is
    read from memory as real data would be. (Drawing `x_t` from a key inside the step does not
    work as a benchmark: XLA fuses the sampler into every consumer and recomputes it per weight.)
    """

    inputs: jax.Array  # (POOL, batch, input)
    targets: jax.Array  # (POOL, batch, outputs) regression targets, or (POOL, batch) labels
    classify: bool = eqx.field(static=True)

    def x(self, t: jax.Array) -> jax.Array:
        return self.inputs[t % self.inputs.shape[0]]

    def loss(self, y: jax.Array, t: jax.Array) -> jax.Array:
        """The batch-mean loss of step `t`: cross-entropy against the labels, or MSE."""
        target = self.targets[t % self.targets.shape[0]]
        if self.classify:
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(y, target))
        return jnp.mean((y - target) ** 2)


@dataclasses.dataclass(frozen=True)
class Problem:
    config: Config
    model: eqtrace.AbstractCell
    params: Any
    static: Any
    stream: Stream

    def sizes(self) -> tuple[int, int]:
        """`(|h|, |θ|)`: the number of state and of parameter numbers of one sample."""
        n_state = sum(leaf.size for leaf in jax.tree.leaves(self.model.init_state()))
        n_params = sum(leaf.size for leaf in jax.tree.leaves(self.params))
        return n_state, n_params

    def batched_init_state(self, params) -> Any:
        """The initial state of every sequence of the batch (built inside the timed call)."""
        model = eqx.combine(params, self.static)
        batch = self.config.batch
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), model.init_state())


def build_problem(config: Config) -> Problem:
    """The network, its parameters, and the data stream of `config.model`."""
    cell_key, readout_key, x_key, y_key = jr.split(jr.key(config.seed), 4)
    batch, n_in, hidden, n_out = config.batch, config.input, config.hidden, 10
    dtype = jnp.result_type(float)
    if config.model != "lif" and (config.detach_reset or config.feedforward):
        raise ValueError("--detach-reset and --feedforward are options of --model lif.")
    if config.model == "gru":
        model = eqtrace.nn.Sequential(
            [
                eqtrace.nn.GRUCell(n_in, hidden, key=cell_key),
                eqx.nn.Linear(hidden, n_out, key=readout_key),
            ]
        )
        # Gaussian inputs; mean squared error against random regression targets.
        stream = Stream(
            jr.normal(x_key, (POOL, batch, n_in), dtype),
            jr.normal(y_key, (POOL, batch, n_out), dtype),
            classify=False,
        )
    elif config.model == "lif":
        model = eqtrace.nn.Sequential(
            [
                eqtrace.nn.LIF(
                    n_in,
                    hidden,
                    recurrent=not config.feedforward,
                    synapse=True,
                    detach_reset=config.detach_reset,
                    key=cell_key,
                ),
                eqtrace.nn.LeakyReadout(hidden, n_out, key=readout_key),
            ]
        )
        # Poisson-like input spikes (10% per step); cross-entropy against random labels.
        stream = Stream(
            jr.bernoulli(x_key, 0.1, (POOL, batch, n_in)).astype(dtype),
            jr.randint(y_key, (POOL, batch), 0, n_out),
            classify=True,
        )
    else:
        raise ValueError(f"--model must be one of {MODELS}, but got {config.model!r}.")
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return Problem(config, model, params, static, stream)
