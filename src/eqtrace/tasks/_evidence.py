"""Evidence accumulation: count left and right cues, decide after a delay."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import PRNGKeyArray

from ._batch import Batch, check_int, check_real, default_dtype, spike_probability


def evidence_accumulation(
    key: PRNGKeyArray,
    batch_size: int,
    *,
    n_cues: int = 7,
    cue: int = 100,
    interval: int = 150,
    delay: int = 1000,
    recall: int = 150,
    population: int = 10,
    cue_rate: float = 40.0,
    noise_rate: float = 10.0,
    bias: float = 0.7,
    dt: float = 1.0,
    dtype: Any = None,
) -> Batch:
    """Evidence accumulation: a series of cues, each on the left or on the right; after a
    delay, say which side had more. The spiking version of the towers task of Morcos and
    Harvey (2016) used by Bellec et al. (2020) for e-prop and by Wang et al. (2026) for D-RTRL
    and ES-D-RTRL.

    The inputs are Poisson spikes of `4 × population` neurons in four populations, in this
    order: left, right, recall, noise. Cue `k` (for `k < n_cues`) occupies the steps
    `[k × interval, k × interval + cue)`: the left or the right population fires at `cue_rate`
    while it lasts, and the rest of its interval is silent. Each trial favours one side, drawn
    with probability 1/2, and each cue is on the favoured side with probability `bias`. After
    the cues come `delay` silent steps, then `recall` steps in which the recall population
    fires at `cue_rate` and the network must answer. The noise population fires at
    `noise_rate` throughout. The label is the side with more cues (0: left, 1: right; `n_cues`
    is odd, so there is no tie); both labels have probability 1/2.

    **Arguments:**

    - `key`: a JAX PRNG key; the same key gives the same batch.
    - `batch_size`: the number of sequences `B`.
    - `n_cues`: the number of cues, odd.
    - `cue`, `interval`: the duration of a cue and the steps from one cue's onset to the
      next's (`1 <= cue <= interval`).
    - `delay`, `recall`: the silent steps after the last cue's interval, and the duration of
      the recall window. The sequence has `T = n_cues × interval + delay + recall` steps.
    - `population`: neurons per population.
    - `cue_rate`, `noise_rate`: firing rates in Hz.
    - `bias`: the probability that a cue is on the trial's favoured side, in `[0, 1]` (0.5:
      every cue is a coin flip; closer to 0 or 1: easier trials).
    - `dt`: the duration of a step in ms; a neuron spikes in a step with probability
      `rate × dt / 1000`.
    - `dtype`: of the spikes (default: JAX's default float dtype).

    **Returns:** a `Batch`: `inputs` `(T, B, 4 × population)` of 0/1 spikes; `targets` `(T, B)`
    int32 labels; `mask` `(T, B)`, true in the recall window (the last `recall` steps), where
    the loss counts.
    """
    function = "evidence_accumulation"
    check_int(function, "batch_size", batch_size, 1)
    check_int(function, "n_cues", n_cues, 1)
    if n_cues % 2 == 0:
        raise ValueError(
            f"{function}: `n_cues` must be odd, so that one side always has more cues, but "
            f"received {n_cues}."
        )
    check_int(function, "cue", cue, 1)
    check_int(function, "interval", interval, 1)
    if cue > interval:
        raise ValueError(
            f"{function}: `cue` must be at most `interval` (a cue lasts `cue` steps of each "
            f"interval), but received `cue={cue}` and `interval={interval}`."
        )
    check_int(function, "delay", delay, 0)
    check_int(function, "recall", recall, 1)
    check_int(function, "population", population, 1)
    check_real(function, "bias", bias, 0.0, 1.0)
    spike_probability(function, dt, cue_rate=cue_rate, noise_rate=noise_rate)
    timing = (n_cues, cue, interval, delay, recall)
    rates = (cue_rate * dt / 1000, noise_rate * dt / 1000)  # spike probabilities per step
    return _evidence(key, batch_size, timing, population, rates, bias, default_dtype(dtype))


@eqx.filter_jit
def _evidence(key, batch_size, timing, population, rates, bias, dtype):
    n_cues, cue, interval, delay, recall = timing
    cue_p, noise_p = rates
    fkey, ckey, skey = jr.split(key, 3)
    favoured = jr.bernoulli(fkey, 0.5, (batch_size, 1))
    on_favoured = jr.bernoulli(ckey, bias, (batch_size, n_cues))
    sides = jnp.where(on_favoured, favoured, ~favoured).astype(jnp.int32)  # (B, n_cues); 1: right
    labels = (2 * jnp.sum(sides, axis=1) > n_cues).astype(jnp.int32)

    length = n_cues * interval + delay + recall
    t = jnp.arange(length)
    slot = t // interval  # the cue whose interval step t is in (>= n_cues after the cues)
    in_cue = (slot < n_cues) & (t % interval < cue)  # (T,)
    side = sides[:, jnp.minimum(slot, n_cues - 1)].T  # (T, B): the side of the current cue
    in_recall = t >= length - recall
    probabilities = jnp.stack(
        [
            jnp.where(in_cue[:, None] & (side == 0), cue_p, 0.0),
            jnp.where(in_cue[:, None] & (side == 1), cue_p, 0.0),
            jnp.broadcast_to(jnp.where(in_recall, cue_p, 0.0)[:, None], (length, batch_size)),
            jnp.full((length, batch_size), noise_p),
        ],
        axis=-1,
    )  # (T, B, 4)
    probabilities = jnp.repeat(probabilities, population, axis=-1)  # (T, B, 4 × population)
    spikes = jr.bernoulli(skey, probabilities).astype(dtype)
    targets = jnp.broadcast_to(labels, (length, batch_size))
    mask = jnp.broadcast_to(in_recall[:, None], (length, batch_size))
    return Batch(spikes, targets, mask)
