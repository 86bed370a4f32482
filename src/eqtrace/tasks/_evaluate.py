"""Evaluating a model on a batch of a task: accuracy in the decision window, firing rates."""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._validation import check_model
from ..nn._spikes import is_spiking, rates_from_spikes, sample_spikes
from ._batch import Batch


class Evaluation(NamedTuple):
    """What [`eqtrace.tasks.evaluate`][] measured on a batch.

    **Fields:**

    - `accuracy`: the fraction of correct answers in the decision window (see
      [`eqtrace.tasks.evaluate`][] for how they are counted), a scalar; `None` for real-valued
      targets (the adding task), which have no classes.
    - `rates`: the mean firing rate of each spiking layer over every step of the batch, in Hz,
      as [`eqtrace.nn.firing_rates`][] gives it (for a network, a dict from the index of each
      spiking layer to its rate); `None` if the model does not spike.
    - `loss`: the mean of `loss_fn` over the steps and samples of the decision window, a
      scalar; `None` without a `loss_fn`.
    """

    accuracy: Float[Array, ""] | None
    rates: Any
    loss: Float[Array, ""] | None


def _shape(x: Any) -> str:
    return f"{jnp.result_type(x).name}{list(jnp.shape(x))}" if hasattr(x, "shape") else repr(x)


def _check_batch(owner: str, batch: Any) -> tuple[Array, Array, Array]:
    if not (isinstance(batch, tuple) and len(batch) == 3):
        received = (
            f"a tuple of {len(batch)} entries"
            if isinstance(batch, tuple)
            else f"a {type(batch).__qualname__}"
        )
        raise TypeError(
            f"{owner}: `batch` must be an `eqtrace.tasks.Batch` (or a tuple `(inputs, targets, "
            f"mask)`), but received {received}. The task generators of `eqtrace.tasks` return "
            "one; build one from arrays with `eqtrace.tasks.Batch(inputs, targets, mask)`."
        )
    inputs, targets, mask = batch
    for name, value in (("inputs", inputs), ("targets", targets), ("mask", mask)):
        if not hasattr(value, "shape"):
            raise TypeError(
                f"{owner}: `batch.{name}` must be an array, but received "
                f"{type(value).__qualname__}."
            )
    if jnp.ndim(inputs) < 2:
        raise ValueError(
            f"{owner}: `batch.inputs` must be time-major with a batch axis, `(T, B, ...)`, but "
            f"received {_shape(inputs)}. For a single sequence `xs` of shape `(T, n_in)`, pass "
            "`xs[:, None]`."
        )
    leading = tuple(inputs.shape[:2])
    if tuple(mask.shape) != leading or tuple(targets.shape[:2]) != leading:
        raise ValueError(
            f"{owner}: `batch.targets` and `batch.mask` must start with the `(T, B)` = "
            f"{leading} of `batch.inputs`, but received targets {_shape(targets)} and mask "
            f"{_shape(mask)}. Give every step a target and a mask entry (repeat a "
            "sequence's label over time, as the task generators do)."
        )
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(
            f"{owner}: `batch.mask` must be boolean (true at the steps of the decision "
            f"window), but received {_shape(mask)}. Pass `mask.astype(bool)`."
        )
    return inputs, targets, mask


def evaluate(
    model: Any,
    batch: Batch | tuple[Any, ...],
    *,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    per_step: bool = False,
) -> Evaluation:
    """Runs a model over a batch of a task and measures it in the decision window: accuracy,
    firing rates and, optionally, the loss.

    The model runs from its initial state `model.init_state()` over the `T` steps of
    `batch.inputs`, `jax.vmap`ped over the batch. The decision window of each sample is the
    steps where `batch.mask` is true. With integer targets (class labels):

    - by default each sample casts one vote: the class whose output, summed over the
      sample's decision window, is the largest (the same class as the output averaged over
      the window), compared with the sample's label, its target at the last step of the
      window. The accuracy is the fraction of samples answered correctly; samples whose window
      is empty are not counted (and if no sample has a window, the accuracy is NaN).
    - with `per_step=True`, every step of the window counts on its own: the class with the
      largest output at that step against that step's target (the copy task, whose target
      changes within the window).

    ```python
    batch = eqtrace.tasks.delayed_match_to_sample(jax.random.key(1), 256)
    result = eqtrace.tasks.evaluate(net, batch)
    print(f"{result.accuracy:.1%}, layer 0 at {result.rates[0]:.1f} Hz")
    ```

    **Arguments:**

    - `model`: an eqtrace cell or [`eqtrace.nn.Sequential`][] whose output at each step is
      one score per class, `(n_classes,)` (for real-valued targets, any array).
    - `batch`: an [`eqtrace.tasks.Batch`][], time-major: `inputs` `(T, B, ...)`, `targets`
      `(T, B)` integer labels or `(T, B, ...)` reals, `mask` `(T, B)` booleans.
    - `loss_fn`: optional; `loss_fn(y, target)` of one sample at one step, with `y` the
      model's output and `target` that step's target, returning a scalar (e.g.
      `optax.softmax_cross_entropy_with_integer_labels`).
    - `per_step`: whether the accuracy counts every step of the window rather than one vote
      per sample.

    **Returns:** an [`eqtrace.tasks.Evaluation`][] `(accuracy, rates, loss)`; `rates` over all
    `T` steps of the batch, in Hz with each cell's `dt` in ms.

    It runs under `jax.jit` (compiled once per model structure, batch shape and `loss_fn`), and
    can be called inside a jitted function.
    """
    owner = "eqtrace.tasks.evaluate"
    check_model(owner, "model", model)
    inputs, targets, mask = _check_batch(owner, batch)
    classify = jnp.issubdtype(jnp.result_type(targets), jnp.integer)
    if classify:
        if targets.ndim != 2:
            raise ValueError(
                f"{owner}: integer `batch.targets` are class labels of shape `(T, B)`, but "
                f"received {_shape(targets)}."
            )
        y = eqx.filter_eval_shape(lambda m, x: m(m.init_state(), x)[1], model, inputs[0, 0])
        if not (hasattr(y, "shape") and len(y.shape) == 1):
            raise ValueError(
                f"{owner}: with class labels as targets, the output of `model` at one step "
                f"must be one score per class, of shape `(n_classes,)`, but it is "
                f"{_shape(y)}. End the network with a layer of one output per class."
            )
    elif per_step:
        raise ValueError(
            f"{owner}: `per_step=True` counts correct classes, but `batch.targets` are real "
            f"numbers ({_shape(targets)}), which have no classes. Drop `per_step`; pass a "
            "`loss_fn` to measure the error."
        )
    return _evaluate(model, inputs, targets, mask, loss_fn, per_step, classify)


@eqx.filter_jit
def _evaluate(model, inputs, targets, mask, loss_fn, per_step, classify) -> Evaluation:
    spiking = is_spiking(model)
    step = jax.vmap(model)
    read_spikes = jax.vmap(lambda state: sample_spikes(model, state))
    state = jax.vmap(lambda _: model.init_state())(jnp.arange(inputs.shape[1]))

    def body(state, x):
        state, y = step(state, x)
        # Only the spikes are kept of each step's state: less memory than the whole state.
        return state, (y, read_spikes(state) if spiking else None)

    _, (ys, spikes) = jax.lax.scan(body, state, inputs)
    rates = rates_from_spikes(model, spikes, None, None) if spiking else None

    accuracy = None
    if classify:
        if per_step:
            correct = (jnp.argmax(ys, axis=-1) == targets) & mask
            accuracy = jnp.sum(correct) / jnp.sum(mask)
        else:
            votes = jnp.sum(jnp.where(mask[..., None], ys, 0), axis=0)  # (B, n_classes)
            # The label of a sample: its target at the last step of its window.
            length = mask.shape[0]
            last = length - 1 - jnp.argmax(mask[::-1], axis=0)
            labels = jnp.take_along_axis(targets, last[None], axis=0)[0]
            counted = jnp.any(mask, axis=0)
            correct = (jnp.argmax(votes, axis=-1) == labels) & counted
            accuracy = jnp.sum(correct) / jnp.sum(counted)

    loss = None
    if loss_fn is not None:
        losses = jax.vmap(jax.vmap(loss_fn))(ys, targets)  # (T, B)
        loss = jnp.sum(jnp.where(mask, losses, 0)) / jnp.sum(mask)
    return Evaluation(accuracy, rates, loss)
