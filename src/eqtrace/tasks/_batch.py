"""The batch every task generator returns, and the argument checks they share."""

from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class Batch(NamedTuple):
    """A batch of sequences of a task, time-major: `inputs[t]` is the input of step `t` for the
    whole batch, as a `jax.vmap`ped online step takes it.

    It unpacks as `inputs, targets, mask = batch`. Pass `inputs` as `xs` and
    `(targets, mask)` as `targets` to `eqtrace.online_gradient` or `eqtrace.bptt_gradient`,
    and count the loss of each step only where `mask` is true:

    ```python
    def loss_fn(y, target):  # y: (B, n_out) at one step; target: (labels, mask), each (B,)
        labels, mask = target
        losses = optax.softmax_cross_entropy_with_integer_labels(y, labels)
        return jnp.sum(mask * losses) / mask.shape[0]
    ```

    **Fields:**

    - `inputs`: `(T, B, n_in)` floats.
    - `targets`: the target of every step, `(T, B, ...)`: integer class labels `(T, B)` for
      the classification tasks (the sequence's label repeated over time; `targets[-1]` is
      the label of each sequence), floats `(T, B, 1)` for the adding task.
    - `mask`: `(T, B)` booleans, true at the steps whose loss counts (the decision window).
    """

    inputs: Float[Array, "T B n_in"]
    targets: Int[Array, "T B"] | Float[Array, "T B 1"]
    mask: Bool[Array, "T B"]


def check_int(function: str, name: str, value: Any, minimum: int) -> None:
    """Raises unless `value` is a Python int `>= minimum` (a count or a number of steps)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{function}: `{name}` must be a Python int, but received {value!r} "
            f"({type(value).__name__})."
        )
    if value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{function}: `{name}` must be {what}, but received {value}.")


def check_real(function: str, name: str, value: Any, low: float, high: float | None) -> None:
    """Raises unless `value` is a real number in `[low, high]` (`high=None`: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{function}: `{name}` must be a Python float, but received {value!r} "
            f"({type(value).__name__})."
        )
    if not (value >= low and (high is None or value <= high)):
        interval = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{function}: `{name}` must be {interval}, but received {value}.")


def spike_probability(function: str, dt: float, **rates: float) -> float:
    """The spike probability per step of the largest total rate (Hz) with steps of `dt` ms,
    raising if it is above one (the rate is too high for the step to hold one spike)."""
    check_real(function, "dt", dt, 0.0, None)
    if dt == 0:
        raise ValueError(f"{function}: `dt` must be positive (milliseconds), but received 0.")
    for name, rate in rates.items():
        check_real(function, name, rate, 0.0, None)
    total = sum(rates.values())
    p = total * dt / 1000
    if p > 1:
        names = " + ".join(f"`{name}`" for name in rates)
        raise ValueError(
            f"{function}: the spike probability per step, ({names}) × `dt` / 1000 = {total:g} Hz "
            f"× {dt:g} ms = {p:g}, must be at most 1. Lower the rates or `dt`."
        )
    return p


def default_dtype(dtype: Any) -> Any:
    """`dtype`, or JAX's default float dtype (float32, float64 with x64 enabled) if `None`."""
    return jnp.result_type(float) if dtype is None else dtype
