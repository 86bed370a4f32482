"""Delayed cue recall: which of two cue populations fired, recalled after a silent delay."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import PRNGKeyArray

from ._batch import Batch, check_int, default_dtype, spike_probability


def cue_recall(
    key: PRNGKeyArray,
    batch_size: int,
    *,
    cue: int = 100,
    delay: int = 1000,
    recall: int = 100,
    population: int = 10,
    cue_rate: float = 50.0,
    noise_rate: float = 10.0,
    dt: float = 1.0,
    dtype: Any = None,
) -> Batch:
    """The spiking working-memory task of `examples/spiking_working_memory.py`: remember which
    of two cues was shown, across a delay, and say it when asked (after the store-recall tasks
    of Bellec et al., 2018).

    The inputs are Poisson spikes of `4 × population` neurons in four populations, in this
    order: cue A, cue B, recall, noise. During the first `cue` steps, population A (label 0) or
    B (label 1) fires at `cue_rate`; then come `delay` steps with only the noise population
    firing (at `noise_rate`, throughout the trial); in the last `recall` steps the recall
    population fires at `cue_rate`, and the network must output the label. Labels are drawn
    with probability 1/2 each; chance is 50 %.

    **Arguments:**

    - `key`: a JAX PRNG key; the same key gives the same batch.
    - `batch_size`: the number of sequences `B`.
    - `cue`, `delay`, `recall`: the durations of the three phases, in steps (`cue` and
      `recall` at least 1, `delay` at least 0). The sequence has `T = cue + delay + recall`
      steps.
    - `population`: neurons per population.
    - `cue_rate`, `noise_rate`: firing rates in Hz.
    - `dt`: the duration of a step in ms; a neuron spikes in a step with probability
      `rate × dt / 1000`.
    - `dtype`: of the spikes (default: JAX's default float dtype).

    **Returns:** a `Batch`: `inputs` `(T, B, 4 × population)` of 0/1 spikes; `targets`
    `(T, B)` int32 labels; `mask` `(T, B)`, true in the recall window (the last `recall`
    steps), where the loss counts.
    """
    function = "cue_recall"
    check_int(function, "batch_size", batch_size, 1)
    check_int(function, "cue", cue, 1)
    check_int(function, "delay", delay, 0)
    check_int(function, "recall", recall, 1)
    check_int(function, "population", population, 1)
    spike_probability(function, dt, cue_rate=cue_rate, noise_rate=noise_rate)
    dtype = default_dtype(dtype)
    cue_p, noise_p = cue_rate * dt / 1000, noise_rate * dt / 1000
    return _cue_recall(key, batch_size, cue, delay, recall, population, cue_p, noise_p, dtype)


@eqx.filter_jit
def _cue_recall(key, batch_size, cue, delay, recall, population, cue_p, noise_p, dtype):
    lkey, skey = jr.split(key)
    length = cue + delay + recall
    labels = jr.bernoulli(lkey, 0.5, (batch_size,)).astype(jnp.int32)
    t = jnp.arange(length)[:, None]  # (T, 1)
    in_cue = t < cue
    in_recall = t >= cue + delay
    probabilities = jnp.stack(
        [
            jnp.where(in_cue & (labels == 0)[None], cue_p, 0.0),
            jnp.where(in_cue & (labels == 1)[None], cue_p, 0.0),
            jnp.broadcast_to(jnp.where(in_recall, cue_p, 0.0), (length, batch_size)),
            jnp.full((length, batch_size), noise_p),
        ],
        axis=-1,
    )  # (T, B, 4)
    probabilities = jnp.repeat(probabilities, population, axis=-1)  # (T, B, 4 × population)
    spikes = jr.bernoulli(skey, probabilities).astype(dtype)
    targets = jnp.broadcast_to(labels, (length, batch_size))
    mask = jnp.broadcast_to(in_recall, (length, batch_size))
    return Batch(spikes, targets, mask)
