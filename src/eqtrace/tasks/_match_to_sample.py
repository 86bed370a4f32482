"""Delayed match-to-sample with direction-tuned Poisson inputs."""

import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import PRNGKeyArray

from ._batch import Batch, check_int, check_real, default_dtype, spike_probability


def delayed_match_to_sample(
    key: PRNGKeyArray,
    batch_size: int,
    *,
    fixation: int = 100,
    sample: int = 500,
    delay: int = 1000,
    test: int = 500,
    n_inputs: int = 24,
    n_directions: int = 8,
    kappa: float = 8.0,
    rate: float = 100.0,
    background_rate: float = 1.0,
    dt: float = 1.0,
    dtype: Any = None,
) -> Batch:
    """Delayed match-to-sample (DMS): a sample stimulus, a long delay, then a test stimulus;
    say whether the test matches the sample. A long-delay spiking task of the kind Wang et al.
    (2026) train with D-RTRL and ES-D-RTRL.

    A stimulus is one of `n_directions` motion directions `θ_d = 2π d / n_directions`. The
    `n_inputs` input neurons have preferred directions `φ_i = 2π i / n_inputs` spread around
    the circle and von Mises tuning: while a stimulus of direction `θ` is shown, neuron `i`
    fires Poisson spikes at `rate × exp(κ (cos(θ − φ_i) − 1))` Hz, on top of a background of
    `background_rate` Hz at all times. The trial has four phases, in steps: `fixation`
    (background only), `sample` (the sample direction), `delay` (background only) and `test`
    (the test direction). In a match trial (label 1, probability 1/2) the test direction is
    the sample direction; in a non-match trial (label 0) it is one of the other directions,
    uniformly. Chance is 50 %.

    **Arguments:**

    - `key`: a JAX PRNG key; the same key gives the same batch.
    - `batch_size`: the number of sequences `B`.
    - `fixation`, `sample`, `delay`, `test`: the durations of the phases, in steps
      (`fixation` and `delay` at least 0, `sample` and `test` at least 1). The sequence has
      `T = fixation + sample + delay + test` steps.
    - `n_inputs`: the number of direction-tuned input neurons.
    - `n_directions`: the number of stimulus directions (at least 2).
    - `kappa`: the concentration of the tuning curves (larger: narrower).
    - `rate`, `background_rate`: the peak stimulus rate and the background rate, in Hz.
    - `dt`: the duration of a step in ms; a neuron spikes in a step with probability
      `rate × dt / 1000`.
    - `dtype`: of the spikes (default: JAX's default float dtype).

    **Returns:** a `Batch`: `inputs` `(T, B, n_inputs)` of 0/1 spikes; `targets` `(T, B)`
    int32 labels (1: match, 0: non-match); `mask` `(T, B)`, true in the test window (the last
    `test` steps), where the loss counts.
    """
    function = "delayed_match_to_sample"
    check_int(function, "batch_size", batch_size, 1)
    check_int(function, "fixation", fixation, 0)
    check_int(function, "sample", sample, 1)
    check_int(function, "delay", delay, 0)
    check_int(function, "test", test, 1)
    check_int(function, "n_inputs", n_inputs, 1)
    check_int(function, "n_directions", n_directions, 2)
    check_real(function, "kappa", kappa, 0.0, None)
    spike_probability(function, dt, rate=rate, background_rate=background_rate)
    phases = (fixation, sample, delay, test)
    rates = (rate * dt / 1000, background_rate * dt / 1000)  # spike probabilities per step
    stimuli = (n_inputs, n_directions, kappa)
    return _match_to_sample(key, batch_size, phases, stimuli, rates, default_dtype(dtype))


@eqx.filter_jit
def _match_to_sample(key, batch_size, phases, stimuli, rates, dtype):
    fixation, sample, delay, test = phases
    n_inputs, n_directions, kappa = stimuli
    stimulus_p, background_p = rates
    mkey, skey, okey, pkey = jr.split(key, 4)
    labels = jr.bernoulli(mkey, 0.5, (batch_size,)).astype(jnp.int32)
    sample_direction = jr.randint(skey, (batch_size,), 0, n_directions)
    offset = jr.randint(okey, (batch_size,), 1, n_directions)  # any other direction
    test_direction = jnp.where(labels == 1, sample_direction, sample_direction + offset)
    test_direction = test_direction % n_directions

    preferred = 2 * math.pi * jnp.arange(n_inputs) / n_inputs
    directions = 2 * math.pi * jnp.arange(n_directions) / n_directions
    tuning = jnp.exp(kappa * (jnp.cos(directions[:, None] - preferred[None]) - 1))  # (D, n)
    length = fixation + sample + delay + test
    t = jnp.arange(length)[:, None, None]  # (T, 1, 1)
    in_sample = (t >= fixation) & (t < fixation + sample)
    in_test = t >= length - test
    shown = jnp.where(in_sample, tuning[sample_direction][None], 0.0)  # (T, B, n)
    shown = shown + jnp.where(in_test, tuning[test_direction][None], 0.0)
    probabilities = stimulus_p * shown + background_p
    spikes = jr.bernoulli(pkey, probabilities).astype(dtype)
    targets = jnp.broadcast_to(labels, (length, batch_size))
    mask = jnp.broadcast_to(in_test[:, :, 0], (length, batch_size))
    return Batch(spikes, targets, mask)
