"""Surrogate spike functions: the Heaviside step forward, a smooth derivative (`jax.custom_jvp`).

Use the functions directly (`surrogate.fast_sigmoid(v - threshold, scale=10.0)`) or hold a
surrogate module in a spiking cell (`eqtrace.nn.LIF(..., surrogate=surrogate.Triangle())`).
"""

from ._surrogate import (
    AbstractSurrogate as AbstractSurrogate,
    Arctan as Arctan,
    FastSigmoid as FastSigmoid,
    Sigmoid as Sigmoid,
    Triangle as Triangle,
    arctan as arctan,
    fast_sigmoid as fast_sigmoid,
    heaviside as heaviside,
    sigmoid as sigmoid,
    triangle as triangle,
)
