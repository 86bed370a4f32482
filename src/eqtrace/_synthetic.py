"""Synthetic gradients (decoupled neural interfaces, Jaderberg et al. 2017): truncated BPTT in
windows, with a learned prediction of the future's cotangent injected at each window's exit.

Truncated BPTT drops the credit that the losses after a window send to the steps inside it,
`dL_{>window}/dh_exit`. A synthetic gradient `ĝ(h_exit)` predicts that cotangent; adding
`⟨stop_gradient(ĝ), h_exit⟩` to the window's loss injects it ahead of the window's reverse pass.
The predictor is fitted online by a bootstrapped target: the next window's cotangent at its entry
(which is this window's exit), its own losses plus *its* prediction pulled back through it.

The credit across windows is the predictor's alone: the windows are plain BPTT from their entry
state, with no eligibility trace (a trace carries the same credit forward, and the two would
count it twice).
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from ._cell import AbstractCell
from ._custom_types import Input, KeyLike, Params, Scalar, State
from ._drivers import (
    ForwardStep,
    LossFn,
    Reduction,
    StepWeights,
    _check_optimizer,
    _kind,
    _Objective,
    _rule_of,
    _scan_blocks,
)
from ._validation import check_count, check_model


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The per-sample layout of a state: its structure, and each leaf's shape and dtype
    (`None` for the leaves that are not floating, which have no cotangent)."""

    structure: Any
    leaves: tuple[tuple[tuple[int, ...], str, bool], ...]  # (shape, dtype name, floating)

    @classmethod
    def of(cls, state: Any) -> "_Layout":
        leaves = tuple(
            (tuple(np.shape(a)), jnp.result_type(a).name, bool(eqx.is_inexact_array(a)))
            for a in jtu.tree_leaves(state)
        )
        return cls(jtu.tree_structure(state), leaves)

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape, _, floating in self.leaves if floating)

    def describe(self) -> str:
        return ", ".join(f"{shape} {dtype}" for shape, dtype, floating in self.leaves if floating)


class SyntheticGradient(eqx.Module):
    """A linear synthetic gradient: the prediction `ĝ = A h + b` of the future cotangent
    `dL_{>window}/dh` at a state `h`, shaped like the state (Jaderberg et al., "Decoupled neural
    interfaces using synthetic gradients", ICML 2017, §3; the paper's RNN experiments use a
    linear predictor).

    `A` is `n × n` and `b` has `n` entries, for `n` the number of floating numbers in one
    sample's state (of every layer, for an `nn.Sequential`); integer and boolean leaves of the
    state (a refractory counter) get no cotangent. Both start at zero, so an untrained
    predictor injects nothing: `eqtrace.synthetic_gradient` is then truncated BPTT. It is an
    ordinary pytree of parameters: train it with any Optax optimiser on the gradient of its
    fitting loss, which `eqtrace.synthetic_gradient` returns and `eqtrace.train_synthetic`
    applies.

    **Arguments:**

    - `model`: the cell or `nn.Sequential` whose state it predicts cotangents for (its
      `init_state()` gives the layout of one sample's state).
    - `key`, `scale`: with `scale > 0`, `A` starts as `scale / √n` times a standard normal draw
      from `key` (`b` stays zero); the default `scale=0` starts at zero.
    """

    weight: Float[Array, "n n"]
    bias: Float[Array, " n"]
    layout: _Layout = eqx.field(static=True, repr=False)

    def __init__(self, model: AbstractCell, *, key: KeyLike | None = None, scale: float = 0.0):
        check_model("SyntheticGradient", "model", model)
        state = model.init_state()
        layout = _Layout.of(state)
        floats = [a for a in jtu.tree_leaves(state) if eqx.is_inexact_array(a)]
        if not floats:
            raise ValueError(
                f"SyntheticGradient: the state of {type(model).__name__} holds no floating "
                f"array (its leaves are {layout.leaves or 'none'}), so there is no cotangent to "
                "predict. A synthetic gradient is for a recurrent model whose state carries "
                "credit between windows; a model without state needs no windows."
            )
        dtype = jnp.result_type(*floats)
        n = layout.size
        if scale and key is None:
            raise ValueError(
                f"SyntheticGradient: `scale={scale!r}` draws the initial weight at random, "
                "which needs `key`. Pass `key=jax.random.key(0)`, or `scale=0` to start at zero."
            )
        weight = jnp.zeros((n, n), dtype)
        if scale:
            weight = scale / math.sqrt(n) * jr.normal(key, (n, n), dtype)
        self.weight = weight
        self.bias = jnp.zeros((n,), dtype)
        self.layout = layout

    def __call__(self, state: State) -> Any:
        """The predicted cotangent at `state`, one sample's state (`jax.vmap` it for a batch).

        **Returns:** a pytree of the state's structure: the prediction in each floating leaf,
        `None` in the others.
        """
        floats = eqx.filter(state, eqx.is_inexact_array)
        flat, unravel = ravel_pytree(floats)
        prediction = self.weight @ flat.astype(self.weight.dtype) + self.bias
        return jtu.tree_map(lambda p, h: p.astype(h.dtype), unravel(prediction), floats)


def _inner(cotangent: Any, state: Any) -> Scalar:
    """`⟨cotangent, state⟩` over the floating leaves (`cotangent` has `None` elsewhere)."""
    floats = eqx.filter(state, eqx.is_inexact_array)
    terms = jtu.tree_leaves(jtu.tree_map(lambda g, h: jnp.sum(g * h), cotangent, floats))
    return sum(terms, jnp.zeros((), jnp.result_type(float)))


def _batch_size(function: str, predictor: SyntheticGradient, state: Any) -> int | None:
    """`None` if `state` is one sample's state of `predictor`'s layout, `B` if it is a batch
    of `B` of them (a leading axis on every leaf); raises otherwise."""
    if not isinstance(predictor, SyntheticGradient):
        raise TypeError(
            f"{function}: `predictor` must be an `eqtrace.SyntheticGradient`, but received "
            f"{type(predictor).__name__}. Create it from the model: "
            "`eqtrace.SyntheticGradient(model)`."
        )
    layout = predictor.layout
    leaves = jtu.tree_leaves(state)
    received = _Layout.of(state)
    fix = (
        "Create the predictor from the model whose state it predicts, "
        "`eqtrace.SyntheticGradient(model)`, and pass that model's state (`model.init_state()`, "
        "or `init_state_and_trace(..., batch_size=B)` for a batch)."
    )
    if received.structure != layout.structure:
        raise ValueError(
            f"{function}: `predictor` does not match `state`: it was made for a state of "
            f"structure {layout.structure}, but `state` has structure {received.structure}. " + fix
        )
    batch = {np.shape(a)[:1] for a in leaves}
    batched = len(batch) == 1 and all(
        np.shape(a)[1:] == shape for a, (shape, _, _) in zip(leaves, layout.leaves)
    )
    for a, (shape, dtype, _) in zip(leaves, layout.leaves):
        unbatched_ok = np.shape(a) == shape
        if not (unbatched_ok or batched) or jnp.result_type(a).name != dtype:
            raise ValueError(
                f"{function}: `predictor` does not match `state`: it predicts cotangents for a "
                f"state of one sample with the floating leaves ({layout.describe()}), but "
                f"`state` has a leaf of shape {np.shape(a)} and dtype {jnp.result_type(a).name} "
                f"where it expects {shape} {dtype} (or a batch of them, `(B, *{shape})`). " + fix
            )
    if all(np.shape(a) == shape for a, (shape, _, _) in zip(leaves, layout.leaves)):
        return None
    return next(iter(batch))[0]


def _predict(predictor: SyntheticGradient, state: Any, batched: bool) -> Any:
    return jax.vmap(predictor)(state) if batched else predictor(state)


def _check_forward(function: str, forward_step: Any) -> None:
    """Refuses an online step or block: its trace would carry the credit across windows a
    second time."""
    kind = _kind(forward_step)
    if kind not in ("step", "block"):
        return
    made_by = "make_online_step" if kind == "step" else "make_online_block"
    raise TypeError(
        f"{function}: `forward_step` must be a plain step (from `make_forward_step`), but "
        f"received an online {kind} of `{_rule_of(forward_step)}` (from `{made_by}`). A "
        "synthetic gradient carries the credit across windows itself, through the windows' "
        "states; a rule's trace (`ExactWindows` or any other) carries the same credit forward, "
        "and the two would count it twice. Pass `eqtrace.make_forward_step(static)` (the "
        "windows are exact BPTT within), or drop the predictor and use "
        "`eqtrace.ExactWindows(rule)` for the trace's credit instead."
    )


def _unrolled(forward_step, objective, params, state, sequences):
    """The window's steps from `state`: the sum of their weighted losses, and (as auxiliary
    values) the exit state and the unweighted loss of each step."""

    def body(carry, inputs):
        state, total = carry
        x, target, weight = inputs
        state, y = forward_step(params, state, x)
        loss = objective.step_loss(y, target)
        return (state, total + (loss if weight is None else weight * loss)), loss

    init = (state, jnp.zeros((), jnp.result_type(float)))
    (state, total), losses = jax.lax.scan(body, init, sequences)
    return total, (state, losses)


def _window(forward_step, objective, params, state, sequences, cotangent_fn):
    """One window: the gradient with respect to `params` of the window's summed (weighted)
    losses plus `⟨stop_gradient(ĝ), h_exit⟩` for `ĝ = cotangent_fn(h_exit)`, and the gradient
    of the same with respect to the entry state (the bootstrapped target at the entry).

    **Returns:** `(loss, grads, entry_cotangent, exit_state, step_losses)`: the summed
    weighted loss of the window, the two gradients (`entry_cotangent` shaped like
    `eqx.filter(state, eqx.is_inexact_array)`), the exit state, and the unweighted loss of
    each step.
    """
    floats, rest = eqx.partition(state, eqx.is_inexact_array)

    def total(params, floats):
        loss, (exit_state, losses) = _unrolled(
            forward_step, objective, params, eqx.combine(floats, rest), sequences
        )
        injected = jax.lax.stop_gradient(cotangent_fn(jax.lax.stop_gradient(exit_state)))
        return loss + _inner(injected, exit_state), (loss, exit_state, losses)

    (_, (loss, exit_state, losses)), (grads, entry) = jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True
    )(params, floats)
    return loss, grads, entry, exit_state, losses


def _fitting_loss(predictor, state, target, batched):
    """`½ Σ (ĝ(h) − target)²` over the floating leaves (and the batch): the predictor's
    regression onto its bootstrapped target (held constant)."""
    prediction = _predict(predictor, state, batched)
    target = jax.lax.stop_gradient(target)
    terms = jtu.tree_leaves(jtu.tree_map(lambda p, t: jnp.sum((p - t) ** 2), prediction, target))
    return 0.5 * sum(terms, jnp.zeros((), predictor.weight.dtype))


def _windows(function, forward_step, objective, params, predictor, state, window, starts, ends):
    """The windows of `objective.sequences`, as `_scan_blocks` bodies need them: the number
    of windows, and the body that computes one window's gradients with the predictor's
    injection at its exit and its fitting loss at its entry."""
    check_count(function, "window", window)
    _check_forward(function, forward_step)
    for name, value in (("sequence_starts", starts), ("sequence_ends", ends)):
        if not isinstance(value, bool):
            raise TypeError(f"{function}: `{name}` must be True or False, but received {value!r}.")
    batched = _batch_size(function, predictor, state) is not None
    length = jtu.tree_leaves(objective.sequences[0])[0].shape[0]
    count = -(-length // window)

    def one(params, predictor, index, state, sequences):
        # No injection where the sequence ends (nothing follows: the true cotangent is zero),
        # no fitting at the sequence's first state (no prediction is ever injected there).
        inject = jnp.logical_or(index < count - 1, not ends)
        fit = jnp.logical_or(index > 0, not starts)

        def cotangent_fn(exit_state):
            prediction = _predict(predictor, exit_state, batched)
            return jtu.tree_map(lambda g: jnp.where(inject, g, jnp.zeros_like(g)), prediction)

        loss, grads, entry, exit_state, losses = _window(
            forward_step, objective, params, state, sequences, cotangent_fn
        )
        fit_loss, predictor_grads = jax.value_and_grad(_fitting_loss)(
            predictor, state, entry, batched
        )
        fit_loss = jnp.where(fit, fit_loss, jnp.zeros_like(fit_loss))
        predictor_grads = jtu.tree_map(
            lambda g: jnp.where(fit, g, jnp.zeros_like(g)), predictor_grads
        )
        return loss, grads, fit_loss, predictor_grads, exit_state, losses

    return count, one


@eqx.filter_jit
def synthetic_gradient(
    forward_step: ForwardStep,
    loss_fn: LossFn,
    params: Params,
    predictor: SyntheticGradient,
    state: State,
    xs: Input,
    targets: Any,
    window: int,
    *,
    reduction: Reduction = "mean",
    step_weights: StepWeights | None = None,
    sequence_targets: bool = False,
    sequence_starts: bool = True,
    sequence_ends: bool = True,
) -> tuple[Scalar, Params, Scalar, SyntheticGradient, State]:
    """Truncated BPTT with synthetic gradients: the gradient over consecutive windows of
    `window` steps, each window's reverse pass started from the predicted future cotangent at
    its exit, and the gradient of the predictor's fitting loss.

    Window `n`, from its entry state `h_{n-1}` (the previous window's exit) to its exit `h_n`,
    is differentiated exactly (BPTT within it) for

    $$
    J_n(θ, h_{n-1}) = \\sum_{t \\in n} w_t L_t + ⟨\\operatorname{sg}(\\hat g(h_n)), h_n⟩,
    $$

    and the parameters' gradient is `Σ_n ∂J_n/∂θ`. The predictor's bootstrapped target at
    `h_{n-1}` is `∂J_n/∂h_{n-1}`: window `n`'s own losses and its prediction at `h_n`, pulled
    back through it; its fitting loss is `Σ_n ½ ‖ĝ(h_{n-1}) − sg(∂J_n/∂h_{n-1})‖²`. With the
    true future cotangent in place of `ĝ`, the gradient is BPTT's; with `ĝ = 0`, it is
    `truncated_bptt_gradient(..., window)`.

    **Arguments:**

    - `forward_step`: from `make_forward_step` (vmapped for a batch:
      `jax.vmap(forward_step, in_axes=(None, 0, 0))`). Not an online step or block: the
      predictor carries the credit across windows, and a rule's trace would carry it twice.
    - `loss_fn`, `params`, `state`, `xs`, `targets`, `reduction`, `step_weights`,
      `sequence_targets`: as for `truncated_bptt_gradient`. The predictor predicts cotangents
      of the summed losses of `loss_fn` (with a batch mean inside `loss_fn`, a sample's
      cotangent is `1/B` of its own loss's).
    - `predictor`: an `eqtrace.SyntheticGradient` of the model (one sample's layout; it is
      vmapped over a batched `state`).
    - `window`: the number of steps per window (a last, shorter window takes the remainder).
    - `sequence_starts`: `True` (the default) if `state` is the sequence's first state: its
      cotangent is not fitted, as nothing is ever injected there. `False` for a piece of a
      stream whose previous piece ended at `state`: its target is fitted here.
    - `sequence_ends`: `True` (the default) if the sequence ends with `xs`: nothing is
      injected at the last exit (nothing follows it). `False` for a piece of a stream that
      continues in the next call, from the state returned.

    **Returns:** `(loss, grads, fit_loss, predictor_grads, final_state)`: the reduced loss
    and gradient (as `truncated_bptt_gradient`), the fitting loss summed over the windows
    whose entry is fitted (with `reduction="mean"`, divided by their number), its gradient
    with respect to `predictor` (a `SyntheticGradient`), and the state after the last step.
    """
    function = "synthetic_gradient"
    objective = _Objective.build(
        function, loss_fn, xs, targets, reduction, step_weights, sequence_targets
    )
    count, one = _windows(
        function, forward_step, objective, params, predictor, state, window,
        sequence_starts, sequence_ends,
    )  # fmt: skip

    def body(carry, sequences):
        index, state, loss, grads, fit_loss, predictor_grads = carry
        step = one(params, predictor, index, state, sequences)
        window_loss, window_grads, window_fit, window_predictor_grads, state, _ = step
        carry = (
            index + 1,
            state,
            loss + window_loss,
            jtu.tree_map(jnp.add, grads, window_grads),
            fit_loss + window_fit,
            jtu.tree_map(jnp.add, predictor_grads, window_predictor_grads),
        )
        return carry, None

    zero = jnp.zeros((), jnp.result_type(float))
    init = (
        jnp.zeros((), jnp.int32),
        state,
        zero,
        jtu.tree_map(jnp.zeros_like, params),
        jnp.zeros((), predictor.weight.dtype),
        jtu.tree_map(jnp.zeros_like, predictor),
    )
    carry, _ = _scan_blocks(body, init, objective.sequences, window)
    _, state, loss, grads, fit_loss, predictor_grads = carry
    loss, grads = objective.reduce(loss, grads)
    if reduction == "mean":
        fitted = max(count - int(sequence_starts), 1)
        fit_loss = fit_loss / fitted
        predictor_grads = jtu.tree_map(lambda g: g / fitted, predictor_grads)
    return loss, grads, fit_loss, predictor_grads, state


@eqx.filter_jit
def train_synthetic(
    forward_step: ForwardStep,
    loss_fn: LossFn,
    # `optax.MultiSteps` is not a `GradientTransformation` instance, but has the same interface.
    optimizer: optax.GradientTransformation | optax.MultiSteps,
    params: Params,
    predictor: SyntheticGradient,
    opt_state: optax.OptState,
    state: State,
    xs: Input,
    targets: Any,
    window: int,
    *,
    step_weights: StepWeights | None = None,
    sequence_targets: bool = False,
    sequence_starts: bool = True,
    sequence_ends: bool = True,
) -> tuple[Params, SyntheticGradient, optax.OptState, State, Any, Float[Array, " windows"]]:
    """Trains with synthetic gradients: one optimiser update of the parameters and of the
    predictor after every window, inside one `lax.scan` (decoupled: a window's update does not
    wait for the windows after it).

    Each window's update is that of `synthetic_gradient` on the window, with the parameters
    and the predictor of that moment: for the parameters, the gradient of the mean of the
    window's (weighted) step losses plus the injected prediction (as `train_online` with
    `block_size=window`, with the prediction scaled alike); for the predictor, the gradient of
    its fitting loss at the window's entry. One optimiser updates both, as the pair
    `(params, predictor)` (`optax.multi_transform` gives them separate learning rates).

    **Arguments:**

    - `forward_step`, `loss_fn`, `xs`, `targets`, `window`, `step_weights`,
      `sequence_targets`, `sequence_starts`, `sequence_ends`: as for `synthetic_gradient`.
    - `optimizer`: an Optax optimiser; `opt_state` its state,
      `optimizer.init((params, predictor))`.
    - `params`, `predictor`, `state`: the model's parameters, the `SyntheticGradient`, and the
      initial state.

    **Returns:** `(params, predictor, opt_state, state, losses, fit_losses)`: the trained
    parameters and predictor, the optimiser state, the final state, the per-step values of
    `loss_fn` (before weighting) stacked over time, and the fitting loss of each window
    (zero for the first window when `sequence_starts`).
    """
    function = "train_synthetic"
    objective = _Objective.build(
        function, loss_fn, xs, targets, "sum", step_weights, sequence_targets
    )
    _, one = _windows(
        function, forward_step, objective, params, predictor, state, window,
        sequence_starts, sequence_ends,
    )  # fmt: skip
    _check_optimizer(optimizer, opt_state, (params, predictor), function, "(params, predictor)")

    def body(carry, sequences):
        index, params, predictor, opt_state, state = carry
        steps = jtu.tree_leaves(sequences[0])[0].shape[0]
        _, grads, fit_loss, predictor_grads, state, losses = one(
            params, predictor, index, state, sequences
        )
        grads = jtu.tree_map(lambda g: g / steps, grads)
        updates, opt_state = optimizer.update(
            (grads, predictor_grads), opt_state, (params, predictor)
        )
        params, predictor = optax.apply_updates((params, predictor), updates)
        return (index + 1, params, predictor, opt_state, state), (losses, fit_loss[None])

    init = (jnp.zeros((), jnp.int32), params, predictor, opt_state, state)
    carry, (losses, fit_losses) = _scan_blocks(body, init, objective.sequences, window)
    _, params, predictor, opt_state, state = carry
    return params, predictor, opt_state, state, losses, fit_losses
