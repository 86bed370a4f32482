"""The copy task: reproduce a sequence of symbols after a delay."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import PRNGKeyArray

from ._batch import Batch, check_int, default_dtype


def copy_task(
    key: PRNGKeyArray,
    batch_size: int,
    *,
    length: int = 10,
    delay: int = 50,
    n_symbols: int = 8,
    dtype: Any = None,
) -> Batch:
    """The copy task (Hochreiter and Schmidhuber, 1997; Arjovsky et al., 2016): read a sequence
    of symbols, wait, and on a go signal write the sequence out again, in order.

    The input at each step is one-hot over `n_symbols + 2` channels: the symbols `0 …
    n_symbols − 1`, then a blank and a go channel. The first `length` steps show the symbols
    (uniform, independent); then come `delay` blank steps, one go step, and `length` blank
    steps during which the network must output the symbols. There are `n_symbols + 1` output
    classes: the symbols, and blank (class `n_symbols`) as the target of every other step.
    Chance on the recalled symbols is `1 / n_symbols`.

    **Arguments:**

    - `key`: a JAX PRNG key; the same key gives the same batch.
    - `batch_size`: the number of sequences `B`.
    - `length`: the number of symbols to copy (at least 1).
    - `delay`: the blank steps between the last symbol and the go signal (at least 0). The
      sequence has `T = 2 × length + delay + 1` steps.
    - `n_symbols`: the size of the alphabet (at least 1).
    - `dtype`: of the inputs (default: JAX's default float dtype).

    **Returns:** a `Batch`: `inputs` `(T, B, n_symbols + 2)` one-hot; `targets` `(T, B)` int32
    classes (the symbols in the last `length` steps, blank before); `mask` `(T, B)`, true in
    the last `length` steps, where the symbols are recalled. Train on the masked steps only,
    or on every step (the mask of ones) to also learn to output blank while waiting.
    """
    function = "copy_task"
    check_int(function, "batch_size", batch_size, 1)
    check_int(function, "length", length, 1)
    check_int(function, "delay", delay, 0)
    check_int(function, "n_symbols", n_symbols, 1)
    return _copy(key, batch_size, length, delay, n_symbols, default_dtype(dtype))


@eqx.filter_jit
def _copy(key, batch_size, length, delay, n_symbols, dtype):
    blank, go = n_symbols, n_symbols + 1
    symbols = jr.randint(key, (length, batch_size), 0, n_symbols, dtype=jnp.int32)
    waiting = jnp.full((delay, batch_size), blank, jnp.int32)
    recalling = jnp.full((length, batch_size), blank, jnp.int32)
    go_step = jnp.full((1, batch_size), go, jnp.int32)
    tokens = jnp.concatenate([symbols, waiting, go_step, recalling])  # (T, B)
    inputs = jax.nn.one_hot(tokens, n_symbols + 2, dtype=dtype)
    targets = jnp.concatenate([jnp.full((length + delay + 1, batch_size), blank), symbols])
    total = 2 * length + delay + 1
    mask = jnp.broadcast_to((jnp.arange(total) >= total - length)[:, None], (total, batch_size))
    return Batch(inputs, targets.astype(jnp.int32), mask)
