"""Pure, jit-friendly drivers on top of a step function: run, accumulate, train, and BPTT."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from ._algorithm import AbstractAlgorithm
from ._cell import AbstractCell
from ._custom_types import ExampleInput, Input, Params, Scalar, State, Trace


OnlineStep = Callable[[Params, State, Trace, Input], tuple[State, Trace, Any]]
ForwardStep = Callable[[Params, State, Input], tuple[State, Any]]
LossFn = Callable[[Any, Any], Scalar]


def make_online_step(algorithm: AbstractAlgorithm, static: Any) -> OnlineStep:
    """The pure online step `online_step(params, state, trace, x) -> (state, trace, y)`.

    **Arguments:**

    - `algorithm`: the online rule, e.g. `eqtrace.DRTRL()`.
    - `static`: the non-array part of the model, from
      `params, static = eqx.partition(model, eqx.is_inexact_array)`.

    **Returns:** a function to `jax.vmap` over a batch (`in_axes=(None, 0, 0, 0)`: parameters
    shared) and `jax.lax.scan` over time. `jax.grad` of a loss on `y` with respect to `params` is
    the online gradient estimate of that step.
    """

    def online_step(params, state, trace, x):
        return algorithm.step(eqx.combine(params, static), state, trace, x)

    return online_step


def make_forward_step(static: Any) -> ForwardStep:
    """The plain step `forward_step(params, state, x) -> (state, y)` of the model, without any
    trace: the baseline for `bptt_gradient` and for inference."""

    def forward_step(params, state, x):
        return eqx.combine(params, static)(state, x)

    return forward_step


def init_state_and_trace(
    model: AbstractCell,
    algorithm: AbstractAlgorithm,
    batch_size: int | None = None,
    x: ExampleInput | None = None,
) -> tuple[State, Trace]:
    """The initial state and trace of `model`, with a leading batch axis if `batch_size` is set.

    `x` is an example input of one step of one sample (only its shape and dtype are used),
    needed when the model does not declare an `input_size`.
    """
    state = model.init_state()
    trace = algorithm.init_trace(model, state, x)
    if batch_size is None:
        return state, trace
    return jtu.tree_map(lambda a: jnp.broadcast_to(a, (batch_size, *a.shape)), (state, trace))


@eqx.filter_jit
def run_online(
    online_step: OnlineStep, params: Params, state: State, trace: Trace, xs: Input
) -> tuple[Any, State, Trace]:
    """Runs `online_step` over the leading (time) axis of `xs`.

    **Returns:** `(ys, state, trace)`: the outputs stacked over time and the final state and trace.
    """

    def body(carry, x):
        state, trace = carry
        state, trace, y = online_step(params, state, trace, x)
        return (state, trace), y

    (state, trace), ys = jax.lax.scan(body, (state, trace), xs)
    return ys, state, trace


def _step_loss_and_grad(online_step, loss_fn, params, state, trace, x, target):
    def step_loss(params):
        new_state, new_trace, y = online_step(params, state, trace, x)
        return loss_fn(y, target), (new_state, new_trace)

    return jax.value_and_grad(step_loss, has_aux=True)(params)


@eqx.filter_jit
def online_gradient(
    online_step: OnlineStep,
    loss_fn: LossFn,
    params: Params,
    state: State,
    trace: Trace,
    xs: Input,
    targets: Any,
) -> tuple[Scalar, Params, State, Trace]:
    """Accumulates the online gradient of `Σ_t loss_fn(y_t, target_t)` over a sequence.

    Memory is constant in the sequence length: the gradient of each step is taken within the
    step and summed, never through the scan.

    **Arguments:**

    - `online_step`: from `make_online_step` (vmapped for a batch).
    - `loss_fn`: `loss_fn(y_t, target_t) -> scalar` for one step (average over the batch inside
      it when `online_step` is vmapped).
    - `params`, `state`, `trace`: as for `online_step`.
    - `xs`, `targets`: inputs and targets with a leading time axis.

    **Returns:** `(loss, grads, state, trace)`: the summed loss, the summed online gradient, and
    the final state and trace.
    """

    def body(carry, inputs):
        state, trace, loss, grads = carry
        (step_loss, (state, trace)), step_grads = _step_loss_and_grad(
            online_step, loss_fn, params, state, trace, *inputs
        )
        grads = jtu.tree_map(jnp.add, grads, step_grads)
        return (state, trace, loss + step_loss, grads), None

    zeros = jtu.tree_map(jnp.zeros_like, params)
    init = (state, trace, jnp.zeros((), jnp.result_type(float)), zeros)
    (state, trace, loss, grads), _ = jax.lax.scan(body, init, (xs, targets))
    return loss, grads, state, trace


@eqx.filter_jit
def train_online(
    online_step: OnlineStep,
    loss_fn: LossFn,
    # `optax.MultiSteps` is not a `GradientTransformation` instance, but has the same interface.
    optimizer: optax.GradientTransformation | optax.MultiSteps,
    params: Params,
    opt_state: optax.OptState,
    state: State,
    trace: Trace,
    xs: Input,
    targets: Any,
) -> tuple[Params, optax.OptState, State, Trace, Any]:
    """Trains truly online: an optimiser update after every step, inside one `lax.scan`.

    For an update every `k` steps, pass `optax.MultiSteps(optimizer, every_k_schedule=k)` (and
    its `init`ialised state): it accumulates the online gradients and applies them every `k`.

    **Returns:** `(params, opt_state, state, trace, losses)` with the per-step losses over time.
    """

    def body(carry, inputs):
        params, opt_state, state, trace = carry
        (loss, (state, trace)), grads = _step_loss_and_grad(
            online_step, loss_fn, params, state, trace, *inputs
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, state, trace), loss

    (params, opt_state, state, trace), losses = jax.lax.scan(
        body, (params, opt_state, state, trace), (xs, targets)
    )
    return params, opt_state, state, trace, losses


def _unrolled_loss(forward_step, loss_fn, params, state, xs, targets):
    def body(carry, inputs):
        state, loss = carry
        x, target = inputs
        state, y = forward_step(params, state, x)
        return (state, loss + loss_fn(y, target)), None

    init = (state, jnp.zeros((), jnp.result_type(float)))
    (state, loss), _ = jax.lax.scan(body, init, (xs, targets))
    return loss, state


@eqx.filter_jit
def bptt_gradient(
    forward_step: ForwardStep,
    loss_fn: LossFn,
    params: Params,
    state: State,
    xs: Input,
    targets: Any,
) -> tuple[Scalar, Params, State]:
    """The reference gradient: `jax.grad` of `Σ_t loss_fn(y_t, target_t)` through `lax.scan`
    (backpropagation through time; memory grows linearly with the sequence length).

    **Returns:** `(loss, grads, final_state)`.
    """
    (loss, state), grads = jax.value_and_grad(_unrolled_loss, argnums=2, has_aux=True)(
        forward_step, loss_fn, params, state, xs, targets
    )
    return loss, grads, state


@eqx.filter_jit
def truncated_bptt_gradient(
    forward_step: ForwardStep,
    loss_fn: LossFn,
    params: Params,
    state: State,
    xs: Input,
    targets: Any,
    window: int,
) -> tuple[Scalar, Params, State]:
    """Truncated BPTT: backpropagation within consecutive windows of `window` steps, with the
    state carried (but not differentiated) across window boundaries. A last, shorter window
    takes the remainder. `window >= len(xs)` is plain BPTT.

    **Returns:** `(loss, grads, final_state)`.
    """
    if window < 1:
        raise ValueError(f"truncated_bptt_gradient: `window` must be >= 1, but got {window}.")
    length = jtu.tree_leaves(xs)[0].shape[0]
    full, rest = divmod(length, window)

    def window_grad(state, xs, targets):
        state = jax.lax.stop_gradient(state)
        (loss, state), grads = jax.value_and_grad(_unrolled_loss, argnums=2, has_aux=True)(
            forward_step, loss_fn, params, state, xs, targets
        )
        return loss, grads, state

    def chunk(tree, start, stop, shape):
        return jtu.tree_map(lambda a: a[start:stop].reshape(*shape, *a.shape[1:]), tree)

    def body(carry, inputs):
        state, loss, grads = carry
        step_loss, step_grads, state = window_grad(state, *inputs)
        return (state, loss + step_loss, jtu.tree_map(jnp.add, grads, step_grads)), None

    loss = jnp.zeros((), jnp.result_type(float))
    grads = jtu.tree_map(jnp.zeros_like, params)
    if full:
        windows = (
            chunk(xs, 0, full * window, (full, window)),
            chunk(targets, 0, full * window, (full, window)),
        )
        (state, loss, grads), _ = jax.lax.scan(body, (state, loss, grads), windows)
    if rest:
        tail = (
            chunk(xs, full * window, length, (rest,)),
            chunk(targets, full * window, length, (rest,)),
        )
        (state, loss, grads), _ = body((state, loss, grads), tail)
    return loss, grads, state
