"""The adding task: sum the two marked numbers of a long sequence."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import PRNGKeyArray

from ._batch import Batch, check_int, default_dtype


def adding_task(
    key: PRNGKeyArray,
    batch_size: int,
    *,
    length: int = 50,
    delay: int = 0,
    dtype: Any = None,
) -> Batch:
    """The adding task (Hochreiter and Schmidhuber, 1997; Le et al., 2015): a sequence of
    random numbers, two of them marked; output their sum at the end.

    The input at each step has two channels: a number, uniform in `[0, 1)`, and a marker,
    1 at the two marked steps and 0 elsewhere. One marked step is uniform in the first half
    of the `length` numbers, the other in the second half. Then come `delay` steps of zeros
    (no number, no marker), and the target, the sum of the two marked numbers, is read at the
    last step. Always answering 1 (the mean) gives a mean squared error of 1/6.

    **Arguments:**

    - `key`: a JAX PRNG key; the same key gives the same batch.
    - `batch_size`: the number of sequences `B`.
    - `length`: the number of numbers (at least 2).
    - `delay`: the steps of zeros after them (at least 0). The sequence has
      `T = length + delay` steps.
    - `dtype`: of the inputs and targets (default: JAX's default float dtype).

    **Returns:** a `Batch`: `inputs` `(T, B, 2)`; `targets` `(T, B, 1)`, the sum repeated
    over time; `mask` `(T, B)`, true at the last step only, where the loss counts (e.g.
    `jnp.sum(mask[:, None] * (y - target) ** 2) / B` with `y` of shape `(B, 1)`).
    """
    function = "adding_task"
    check_int(function, "batch_size", batch_size, 1)
    check_int(function, "length", length, 2)
    check_int(function, "delay", delay, 0)
    return _adding(key, batch_size, length, delay, default_dtype(dtype))


@eqx.filter_jit
def _adding(key, batch_size, length, delay, dtype):
    vkey, fkey, skey = jr.split(key, 3)
    half = length // 2
    values = jr.uniform(vkey, (length, batch_size), dtype)
    first = jr.randint(fkey, (batch_size,), 0, half)
    second = jr.randint(skey, (batch_size,), half, length)
    t = jnp.arange(length)[:, None]
    markers = ((t == first[None]) | (t == second[None])).astype(dtype)  # (length, B)
    inputs = jnp.stack([values, markers], axis=-1)  # (length, B, 2)
    inputs = jnp.concatenate([inputs, jnp.zeros((delay, batch_size, 2), dtype)])
    total = jnp.sum(values * markers, axis=0)  # (B,)
    steps = length + delay
    targets = jnp.broadcast_to(total[None, :, None], (steps, batch_size, 1))
    mask = jnp.broadcast_to((jnp.arange(steps) == steps - 1)[:, None], (steps, batch_size))
    return Batch(inputs, targets, mask)
