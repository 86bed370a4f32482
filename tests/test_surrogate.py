import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqtrace.nn import surrogate


# Independent, hand-written surrogate derivatives (not the library's helpers).
def _sigmoid_derivative(x, k):
    s = 1 / (1 + np.exp(-k * x))
    return k * s * (1 - s)


def _fast_sigmoid_derivative(x, scale):
    return 1 / (1 + scale * np.abs(x)) ** 2


def _triangle_derivative(x, width, dampening):
    return dampening / width * np.maximum(0.0, 1 - np.abs(x) / width)


def _arctan_derivative(x, alpha):
    return alpha / 2 / (1 + (math.pi / 2 * alpha * x) ** 2)


# (function, its keyword arguments, the module with the same parameters, analytic derivative)
CASES = {
    "sigmoid": (
        surrogate.sigmoid,
        dict(steepness=3.0),
        surrogate.Sigmoid(steepness=3.0),
        lambda x: _sigmoid_derivative(x, 3.0),
    ),
    "fast_sigmoid": (
        surrogate.fast_sigmoid,
        dict(scale=4.0),
        surrogate.FastSigmoid(scale=4.0),
        lambda x: _fast_sigmoid_derivative(x, 4.0),
    ),
    "triangle": (
        surrogate.triangle,
        dict(width=0.5, dampening=0.3),
        surrogate.Triangle(width=0.5, dampening=0.3),
        lambda x: _triangle_derivative(x, 0.5, 0.3),
    ),
    "arctan": (
        surrogate.arctan,
        dict(alpha=2.5),
        surrogate.Arctan(alpha=2.5),
        lambda x: _arctan_derivative(x, 2.5),
    ),
}
POINTS = np.array([-3.0, -0.7, -0.25, -1e-3, 0.0, 1e-3, 0.2, 0.45, 0.6, 2.0])


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_forward_is_heaviside(name, dtype):
    function, kwargs, module, _ = CASES[name]
    x = jnp.asarray(np.concatenate([POINTS, [-0.0, 1e-30, -1e-30]]), dtype)
    expected = jnp.asarray(np.asarray(x) > 0, dtype)
    for y in (function(x, **kwargs), function(x), module(x), jax.jit(module)(x)):
        assert y.dtype == dtype
        assert jnp.array_equal(y, expected)
    assert function(jnp.zeros((), dtype), **kwargs) == 0
    assert jnp.array_equal(surrogate.heaviside(x), expected)


@pytest.mark.parametrize("name", CASES)
def test_derivative_forward_and_reverse(name):
    function, kwargs, module, derivative = CASES[name]
    x = jnp.asarray(POINTS)
    expected = derivative(POINTS)
    tangent = jnp.linspace(0.5, 2.0, x.size)

    # Forward mode: the custom JVP (what the online rules push tangents through).
    y, y_dot = jax.jvp(lambda x: function(x, **kwargs), (x,), (tangent,))
    assert jnp.array_equal(y, jnp.asarray(POINTS > 0, x.dtype))
    np.testing.assert_allclose(y_dot, expected * np.asarray(tangent), rtol=1e-12, atol=0)
    _, y_dot = jax.jit(lambda x, t: jax.jvp(module, (x,), (t,)))(x, tangent)
    np.testing.assert_allclose(y_dot, expected * np.asarray(tangent), rtol=1e-12, atol=0)

    # Reverse mode, pointwise and through a vmap.
    for i, p in enumerate(POINTS):
        grad = jax.grad(lambda x: function(x, **kwargs))(jnp.asarray(p))
        np.testing.assert_allclose(grad, expected[i], rtol=1e-12, atol=0)
    grads = jax.vmap(jax.grad(module))(x)
    np.testing.assert_allclose(grads, expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(module.derivative(x), expected, rtol=1e-12, atol=0)
    # The triangle has compact support: zero derivative outside it.
    if name == "triangle":
        assert grads[0] == 0 and grads[-1] == 0 and grads[4] > 0


def test_modules_are_static_and_hashable():
    a, b, c = surrogate.FastSigmoid(10.0), surrogate.FastSigmoid(10), surrogate.FastSigmoid(3.0)
    assert a == b and hash(a) == hash(b) and a != c
    assert isinstance(b.scale, float)
    for _, _, module, _ in CASES.values():
        assert jax.tree_util.tree_leaves(module) == []  # no array (or float) leaves
        assert eqx.filter(module, eqx.is_inexact_array) == module
        hash(module)


def test_invalid_parameters():
    with pytest.raises(ValueError, match="steepness"):
        surrogate.Sigmoid(steepness=0.0)
    with pytest.raises(ValueError, match="width"):
        surrogate.triangle(jnp.zeros(2), width=-1.0)
