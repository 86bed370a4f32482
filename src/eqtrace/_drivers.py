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
#: Same signature, but `T` steps at once: inputs and outputs carry a leading time axis.
OnlineBlock = OnlineStep
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


def make_online_block(algorithm: AbstractAlgorithm, static: Any) -> OnlineBlock:
    """The pure online block `online_block(params, state, trace, xs) -> (state, trace, ys)`:
    as many steps as `xs` has entries along its leading (time) axis, `ys` stacked likewise.

    Values and gradients are those of the online step called once per entry; the algorithm
    may compute them in fewer passes over the trace (`DRTRL` reads and writes its trace once
    per block instead of once per step, which is several times faster for large traces).
    The gradient of a step is then available at the end of its block, not right after it.

    **Arguments:** as for `make_online_step`.

    **Returns:** a function to `jax.vmap` over a batch with time kept leading:
    `jax.vmap(online_block, in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1))`; pass it to
    `online_gradient(..., block_size=C)`.
    """

    def online_block(params, state, trace, xs):
        return algorithm.steps(eqx.combine(params, static), state, trace, xs)

    return online_block


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
    online_step: OnlineStep | OnlineBlock,
    loss_fn: LossFn,
    params: Params,
    state: State,
    trace: Trace,
    xs: Input,
    targets: Any,
    *,
    block_size: int | None = None,
) -> tuple[Scalar, Params, State, Trace]:
    """Accumulates the online gradient of `Σ_t loss_fn(y_t, target_t)` over a sequence.

    Memory is constant in the sequence length: the gradient of each step is taken within the
    step (or within its block) and summed, never through the whole scan.

    **Arguments:**

    - `online_step`: from `make_online_step` (vmapped for a batch); with `block_size`, an
      online block from `make_online_block` (vmapped with time leading).
    - `loss_fn`: `loss_fn(y_t, target_t) -> scalar` for one step (average over the batch inside
      it when `online_step` is vmapped).
    - `params`, `state`, `trace`: as for `online_step`.
    - `xs`, `targets`: inputs and targets with a leading time axis.
    - `block_size`: if given, run `block_size` steps per call of the online block (a last,
      shorter block takes the remainder). The result is the same; the extra memory is that of
      one block's per-step Jacobians.

    **Returns:** `(loss, grads, state, trace)`: the summed loss, the summed online gradient, and
    the final state and trace.
    """
    if block_size is not None and block_size < 1:
        raise ValueError(f"online_gradient: `block_size` must be >= 1, but got {block_size}.")

    def call_loss(ys, targets):
        """The loss of one call of `online_step`: of one step, or of a block's steps summed."""
        if block_size is None:
            return loss_fn(ys, targets)
        return jnp.sum(jax.vmap(loss_fn)(ys, targets))

    def body(carry, inputs):
        state, trace, loss, grads = carry
        (step_loss, (state, trace)), step_grads = _step_loss_and_grad(
            online_step, call_loss, params, state, trace, *inputs
        )
        grads = jtu.tree_map(jnp.add, grads, step_grads)
        return (state, trace, loss + step_loss, grads), None

    zeros = jtu.tree_map(jnp.zeros_like, params)
    init = (state, trace, jnp.zeros((), jnp.result_type(float)), zeros)
    if block_size is None:
        (state, trace, loss, grads), _ = jax.lax.scan(body, init, (xs, targets))
    else:
        state, trace, loss, grads = _scan_blocks(body, init, (xs, targets), block_size)
    return loss, grads, state, trace


def _scan_blocks(body: Callable, carry: Any, sequences: Any, size: int) -> Any:
    """Runs `body(carry, block) -> (carry, _)` over consecutive blocks of `size` steps of
    `sequences` (leading time axis), a last, shorter block taking the remainder."""
    length = jtu.tree_leaves(sequences)[0].shape[0]
    full, rest = divmod(length, size)
    if full:
        blocks = jtu.tree_map(
            lambda a: a[: full * size].reshape(full, size, *a.shape[1:]), sequences
        )
        carry, _ = jax.lax.scan(body, carry, blocks)
    if rest:
        carry, _ = body(carry, jtu.tree_map(lambda a: a[full * size :], sequences))
    return carry


@eqx.filter_jit
def train_online(
    online_step: OnlineStep | OnlineBlock,
    loss_fn: LossFn,
    # `optax.MultiSteps` is not a `GradientTransformation` instance, but has the same interface.
    optimizer: optax.GradientTransformation | optax.MultiSteps,
    params: Params,
    opt_state: optax.OptState,
    state: State,
    trace: Trace,
    xs: Input,
    targets: Any,
    *,
    block_size: int | None = None,
) -> tuple[Params, optax.OptState, State, Trace, Any]:
    """Trains truly online: an optimiser update after every step, inside one `lax.scan`.

    For an update every `k` steps, pass `optax.MultiSteps(optimizer, every_k_schedule=k)` (and
    its `init`ialised state): it accumulates the online gradients and applies them every `k`.
    Or pass an online block (`make_online_block`) with `block_size=k`: one update per block
    with the mean of its steps' online gradients, the same as `MultiSteps` on the stepped
    version, in fewer passes over the trace. The sequence length must then be a multiple of
    `block_size`.

    **Returns:** `(params, opt_state, state, trace, losses)` with the per-step losses over time.
    """

    def block_loss(params, state, trace, xs, targets):
        state, trace, ys = online_step(params, state, trace, xs)
        losses = jax.vmap(loss_fn)(ys, targets)
        return jnp.mean(losses), (state, trace, losses)

    def body(carry, inputs):
        params, opt_state, state, trace = carry
        if block_size is None:
            (losses, (state, trace)), grads = _step_loss_and_grad(
                online_step, loss_fn, params, state, trace, *inputs
            )
        else:
            (_, (state, trace, losses)), grads = jax.value_and_grad(block_loss, has_aux=True)(
                params, state, trace, *inputs
            )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, state, trace), losses

    sequences = (xs, targets)
    if block_size is not None:
        length = jtu.tree_leaves(xs)[0].shape[0]
        if block_size < 1 or length % block_size:
            raise ValueError(
                f"train_online: `block_size` must be a positive divisor of the sequence length "
                f"{length} (one update per whole block), but got {block_size}."
            )
        sequences = jtu.tree_map(
            lambda a: a.reshape(length // block_size, block_size, *a.shape[1:]), sequences
        )
    (params, opt_state, state, trace), losses = jax.lax.scan(
        body, (params, opt_state, state, trace), sequences
    )
    if block_size is not None:
        losses = losses.reshape(-1, *losses.shape[2:])
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

    def window_grad(state, xs, targets):
        state = jax.lax.stop_gradient(state)
        (loss, state), grads = jax.value_and_grad(_unrolled_loss, argnums=2, has_aux=True)(
            forward_step, loss_fn, params, state, xs, targets
        )
        return loss, grads, state

    def body(carry, inputs):
        state, loss, grads = carry
        step_loss, step_grads, state = window_grad(state, *inputs)
        return (state, loss + step_loss, jtu.tree_map(jnp.add, grads, step_grads)), None

    loss = jnp.zeros((), jnp.result_type(float))
    grads = jtu.tree_map(jnp.zeros_like, params)
    state, loss, grads = _scan_blocks(body, (state, loss, grads), (xs, targets), window)
    return loss, grads, state
