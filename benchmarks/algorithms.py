"""The algorithms that `--algorithms` can name: one registry entry per configuration.

To add a configuration, add one `Algorithm(...)` line to `REGISTRY`: its name, the factory of
its eqtrace rule (or of a baseline's runner), and what it is (`block`, `trace_dtype`, the
capability flags).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import eqtrace

from .problems import Config, Problem, Stream


MB = 2**20
# `run(params, stream)`: one batch of sequences of `config.steps` steps; `forward` returns the
# summed loss, every other algorithm `(loss, grads)`.
Runner = Callable[[Any, Stream], Any]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One configuration: a plain-JAX baseline, or an eqtrace rule stepped or run in blocks.

    Exactly one of `baseline` (the runner of a reference computation) and `rule` (the eqtrace
    algorithm, from the configuration and `trace_dtype`) is given.
    """

    name: str
    baseline: Callable[[Problem], Runner] | None = None
    rule: Callable[[Config, Any], eqtrace.AbstractAlgorithm] | None = None
    # `--block` steps per call of `eqtrace.make_online_block`: the same gradient, fewer passes
    # over the trace.
    block: bool = False
    trace_dtype: Any = None  # the dtype the weight traces are stored in; None: the model's
    exact: bool = False  # the gradient equals BPTT's on any model
    per_layer: bool = False  # one trace per cell (diagonal rules), not one for the network
    # Blocks pay off: a block costs less than its steps and its memory stays bounded (RTRL's
    # default block would keep one full Jacobian per step).
    supports_blocks: bool = False
    # The trace is the full Jacobian dh/dθ, batch·|h|·|θ| numbers: skipped above --rtrl-limit.
    jacobian_trace: bool = False
    # The trace may be as large as the Jacobian (SnAp-n on a dense cell): skipped when its
    # batched trace holds more than --rtrl-limit numbers.
    sized_trace: bool = False
    # The rule accepts only some cells (OTTT, OTPE): skipped, with its refusal, on the others.
    may_refuse: bool = False
    # `eqtrace.ExactWindows(rule)` in blocks: BPTT within each window of `--block` steps, the
    # rule's trace across them (a different gradient, the same trace).
    windows: bool = False

    def __post_init__(self):
        if (self.baseline is None) == (self.rule is None):
            raise ValueError(f"{self.name}: give exactly one of `baseline` and `rule`.")
        if self.block and not self.supports_blocks:
            raise ValueError(f"{self.name}: runs in blocks but does not support them.")
        if self.windows and not self.block:
            raise ValueError(f"{self.name}: exact windows are run in blocks.")

    @property
    def online(self) -> bool:
        return self.rule is not None

    def make_rule(self, config: Config) -> eqtrace.AbstractAlgorithm:
        assert self.rule is not None, f"{self.name} is a baseline, not an online rule"
        rule = self.rule(config, self.trace_dtype)
        return eqtrace.ExactWindows(rule) if self.windows else rule

    def runner(self, problem: Problem) -> Runner:
        """The function that one timed call runs; see `Runner`."""
        if self.baseline is not None:
            return self.baseline(problem)
        return _online_runner(problem, self.make_rule(problem.config), self.block)

    def batched_trace(self, problem: Problem) -> Any:
        """The shapes and dtypes of this rule's trace for the whole batch (nothing computed)."""
        algorithm = self.make_rule(problem.config)
        _, trace = jax.eval_shape(
            lambda: eqtrace.init_state_and_trace(problem.model, algorithm, problem.config.batch)
        )
        return trace

    def skip_reason(self, problem: Problem) -> str | None:
        """Why this configuration is not run on `problem`, or `None`."""
        if self.may_refuse:
            try:
                self.batched_trace(problem)
            except eqtrace.StructureError as error:
                # The refusal's first two lines: what it needs and what the cell breaks.
                why = " ".join(line.strip() for line in str(error).splitlines()[:2])
                return f"{self.name} skipped: {why}"
        if self.sized_trace:
            numbers = sum(leaf.size for leaf in jax.tree.leaves(self.batched_trace(problem)))
            if numbers > problem.config.rtrl_limit:
                return (
                    f"{self.name} skipped: its batched trace would hold {numbers:.2e} numbers "
                    f"> --rtrl-limit {problem.config.rtrl_limit:.0e}"
                )
            return None
        if not self.jacobian_trace:
            return None
        n_state, n_params = problem.sizes()
        config = problem.config
        numbers = config.batch * n_state * n_params
        if numbers > config.rtrl_limit:
            return (
                f"{self.name} skipped: its trace would hold batch·|h|·|θ| = {config.batch}·"
                f"{n_state}·{n_params} = {numbers:.2e} numbers > --rtrl-limit "
                f"{config.rtrl_limit:.0e} (and cost |h| times that per step)"
            )
        return None


def trace_megabytes(trace: Any) -> float:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(trace)) / MB


class _OnStream(eqx.Module):
    """`step(params, state, [trace,] t)`: a batched step fed `x_t` from the stream. A module,
    so that the stream's arrays are traced arguments of the drivers' `filter_jit`."""

    step: Callable = eqx.field(static=True)
    stream: Stream

    def __call__(self, params, *carry_and_t):
        *carry, t = carry_and_t
        return self.step(params, *carry, self.stream.x(t))


def _batched_forward_step(problem: Problem) -> Callable:
    return jax.vmap(eqtrace.make_forward_step(problem.static), in_axes=(None, 0, 0))


def _forward(problem: Problem) -> Runner:
    """The loss only: a `lax.scan` of the batched forward step."""
    forward_step, steps = _batched_forward_step(problem), problem.config.steps

    def run_forward(params, stream):
        def body(carry, t):
            state, loss = carry
            state, y = forward_step(params, state, stream.x(t))
            return (state, loss + stream.loss(y, t)), None

        init = (problem.batched_init_state(params), jnp.zeros((), jnp.result_type(float)))
        (_, loss), _ = jax.lax.scan(body, init, jnp.arange(steps))
        return loss

    return run_forward


def _bptt(problem: Problem) -> Runner:
    """Loss and gradient by `jax.grad` through the scan (`eqtrace.bptt_gradient`)."""
    forward_step, steps = _batched_forward_step(problem), problem.config.steps

    def run_bptt(params, stream):
        ts = jnp.arange(steps)
        state = problem.batched_init_state(params)
        loss, grads, _ = eqtrace.bptt_gradient(
            _OnStream(forward_step, stream), stream.loss, params, state, ts, ts
        )
        return loss, grads

    return run_bptt


def _dni(problem: Problem) -> Runner:
    """Synthetic gradients (`eqtrace.synthetic_gradient`): BPTT in windows of `--block` steps,
    each started from a linear predictor's cotangent at its exit, and the predictor's fitting
    gradient. The predictor is untrained (zero), so the model's gradient is truncated BPTT's;
    its time and memory are those of any predictor (the same operations)."""
    forward_step, config = _batched_forward_step(problem), problem.config
    predictor = eqtrace.SyntheticGradient(problem.model)

    def run_dni(params, stream):
        ts = jnp.arange(config.steps)
        state = problem.batched_init_state(params)
        # A barrier, so that XLA cannot simplify products with the zero predictor away.
        g = jax.lax.optimization_barrier(predictor)
        loss, grads, _, predictor_grads, _ = eqtrace.synthetic_gradient(
            _OnStream(forward_step, stream), stream.loss, params, g, state, ts, ts, config.block,
            reduction="sum",
        )  # fmt: skip
        return loss, grads, predictor_grads

    return run_dni


def _online_runner(problem: Problem, algorithm: eqtrace.AbstractAlgorithm, block: bool) -> Runner:
    """Loss and online gradient by `eqtrace.online_gradient`, stepping or in blocks. The initial
    state and trace are built inside, so the inputs are the parameters and the data."""
    config = problem.config
    if block:
        online_step = jax.vmap(
            eqtrace.make_online_block(algorithm, problem.static),
            in_axes=(None, 0, 0, 1),
            out_axes=(0, 0, 1),
        )
    else:
        online_step = jax.vmap(
            eqtrace.make_online_step(algorithm, problem.static), in_axes=(None, 0, 0, 0)
        )

    def run_online(params, stream):
        ts = jnp.arange(config.steps)
        model = eqx.combine(params, problem.static)
        state, trace = eqtrace.init_state_and_trace(model, algorithm, config.batch)
        loss, grads, _, _ = eqtrace.online_gradient(
            _OnStream(online_step, stream),
            stream.loss,
            params,
            state,
            trace,
            ts,
            ts,
            block_size=config.block if block else None,
        )
        return loss, grads

    return run_online


# The rules' factories take the configuration and the trace dtype; only D-RTRL has a
# `trace_dtype` option (the registry test checks that a declared dtype is the one stored).
def _rtrl(config: Config, trace_dtype: Any) -> eqtrace.AbstractAlgorithm:
    return eqtrace.RTRL()


def _drtrl(config: Config, trace_dtype: Any) -> eqtrace.AbstractAlgorithm:
    return eqtrace.DRTRL(trace_dtype=trace_dtype)


def _snap1(config: Config, trace_dtype: Any) -> eqtrace.AbstractAlgorithm:
    return eqtrace.SnAp1()


def _eprop(config: Config, trace_dtype: Any) -> eqtrace.AbstractAlgorithm:
    return eqtrace.EProp()


def _ppprop(config: Config, trace_dtype: Any) -> eqtrace.AbstractAlgorithm:
    return eqtrace.PPProp(rank=config.rank)


def _uoro(config: Config, trace_dtype: Any) -> eqtrace.AbstractAlgorithm:
    # A fixed seed; `init_state_and_trace` splits it into one key per sample.
    return eqtrace.UORO(key=jax.random.key(0))


def _ottt(config: Config, trace_dtype: Any) -> eqtrace.AbstractAlgorithm:
    return eqtrace.OTTT()


def _otpe(config: Config, trace_dtype: Any) -> eqtrace.AbstractAlgorithm:
    # The LIF layer's membrane leak exp(−dt/τ_mem) at its defaults (dt = 1, τ_mem = 20): with
    # a synapse (two state leaves) OTPE cannot read it from the code.
    return eqtrace.OTPE(leak=math.exp(-1.0 / 20.0))


def _snap2(config: Config, trace_dtype: Any) -> eqtrace.AbstractAlgorithm:
    return eqtrace.SnAp(2)


def _snap3(config: Config, trace_dtype: Any) -> eqtrace.AbstractAlgorithm:
    return eqtrace.SnAp(3)


_RTRL = dict(rule=_rtrl, exact=True, jacobian_trace=True)
_DRTRL = dict(rule=_drtrl, per_layer=True, supports_blocks=True)
_SNAP1 = dict(rule=_snap1, per_layer=True, supports_blocks=True)
_PPPROP = dict(rule=_ppprop, per_layer=True, supports_blocks=True)
# Blocks pass once over the traces per block, as D-RTRL's; under a leaky read-out (the "lif"
# model) they also fold the read-out's filter into the block (`EProp.cell_output_steps`).
_EPROP = dict(rule=_eprop, per_layer=True, supports_blocks=True)

REGISTRY = {
    a.name: a
    for a in (
        Algorithm("forward", baseline=_forward),
        Algorithm("bptt", baseline=_bptt, exact=True),
        Algorithm("rtrl", **_RTRL),
        Algorithm("drtrl", **_DRTRL),
        Algorithm("drtrl-block", block=True, **_DRTRL),
        # bfloat16 traces, float32 arithmetic: half the trace traffic.
        Algorithm("drtrl-bf16", trace_dtype=jnp.bfloat16, **_DRTRL),
        Algorithm("snap1", **_SNAP1),
        Algorithm("snap1-block", block=True, **_SNAP1),
        Algorithm("eprop", **_EPROP),
        Algorithm("eprop-block", block=True, **_EPROP),
        Algorithm("ppprop", **_PPPROP),
        Algorithm("ppprop-block", block=True, **_PPPROP),
        # Unbiased, |h| + |θ| per sample. Its blocks form θ̃ every step (ρ_0 divides by its
        # norm) but keep no step's θ̃ for the derivative (`UORO.cell_steps`).
        Algorithm("uoro", rule=_uoro),
        Algorithm("uoro-block", rule=_uoro, block=True, supports_blocks=True),
        # BPTT within windows of `--block` steps, D-RTRL's trace across them.
        Algorithm("drtrl-window", block=True, windows=True, **_DRTRL),
        # Issue 25's rules. None has a block form of its own (their blocks would scan steps).
        # OTTT: LIF with its reset detached (`--detach-reset`); OTPE: and feed-forward
        # (`--feedforward`). Skipped, with their refusal, on other cells.
        Algorithm("ottt", rule=_ottt, per_layer=True, may_refuse=True),
        Algorithm("otpe", rule=_otpe, per_layer=True, may_refuse=True),
        # SnAp-2 and -3: on a dense recurrent cell their trace is RTRL's.
        Algorithm("snap2", rule=_snap2, per_layer=True, sized_trace=True),
        Algorithm("snap3", rule=_snap3, per_layer=True, sized_trace=True),
        # Synthetic gradients (DNI) in windows of `--block` steps; no trace.
        Algorithm("dni", baseline=_dni),
    )
}
ALGORITHMS = tuple(REGISTRY)


def get(name: str) -> Algorithm:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown algorithm {name!r}; expected one of {ALGORITHMS}.") from None


def stepping(algorithm: Algorithm) -> Algorithm:
    """The stepping configuration of the same rule and trace dtype (the one whose trace a block
    configuration carries between blocks): `algorithm` itself if it steps."""
    if algorithm.block:
        for other in REGISTRY.values():
            if (
                not other.block
                and not other.windows
                and other.rule is algorithm.rule
                and other.trace_dtype == algorithm.trace_dtype
            ):
                return other
    return algorithm
