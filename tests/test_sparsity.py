"""The dependency patterns of `eqtrace._sparsity` against numeric Jacobians: a pattern must
cover every non-zero that any draw shows (random draws serve only as this cross-check), and be
exact where values cannot matter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from eqtrace._sparsity import identity_colours, pullback_pattern
from eqtrace.nn import surrogate


@jax.custom_vjp
def _spike(x):
    return (x > 0).astype(x.dtype)


_spike.defvjp(lambda x: (_spike(x), x), lambda x, g: (g * jnp.maximum(0.0, 1 - jnp.abs(x)),))


#: A constant table whose last column `lax.reduce(…, lambda a, b: b, …)` takes: a `reduce`
#: with a computation of its own holds a jaxpr and was walked as a call, which took the
#: value of its initial value (zero) and cut the dependence of a product with it.
_TABLE = np.array([[1.0, 2.0], [0.0, 3.0], [4.0, 5.0], [6.0, 0.0]])


def _scatter(h, x):
    return jnp.zeros(5).at[jnp.array([0, 2, 2, 4])].add(h) + x[0]


FUNCTIONS = {
    "narrow-clip": lambda h, x: jnp.clip(h + x[0], 0.95, 1.0),
    "window": lambda h, x: jnp.where((h > 1.0) & (h < 1.05), h, 0.0) * x[1],
    "custom-jvp-surrogate": lambda h, x: surrogate.triangle(h - x[0], width=0.05),
    "custom-vjp-surrogate": lambda h, x: _spike(h - x[0]),
    "permutation": lambda h, x: jnp.tanh(h)[jnp.array([3, 0, 1, 2])] + x[0],
    "scatter-add": _scatter,
    "scatter-set": lambda h, x: jnp.zeros(4).at[jnp.array([0, 2, 3, 1])].set(h) * x[0],
    "cond": lambda h, x: lax.cond(jnp.sum(h) > 0, lambda v: 2 * v, jnp.sin, h),
    "fori-micro-steps": lambda h, x: lax.fori_loop(0, 3, lambda i, v: v + 0.1 * jnp.tanh(v), h),
    "while": lambda h, x: lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.5), (0, h)
    )[1],
    "roll": lambda h, x: jnp.roll(h, 1) * x[0],
    "matmul": lambda h, x: x[0] * jnp.ones((4, 4)) @ h,
    "cumsum": lambda h, x: jnp.cumsum(h),
    "sort": lambda h, x: jnp.sort(h),
    "pad-slice": lambda h, x: jnp.pad(h, (1, 1))[1:-1] * 2,
    "generic-reduce": lambda h, x: lax.reduce(_TABLE, 0.0, lambda a, b: b, (1,)) * h,
    # Placement and fences move no value between elements (a step traced under a mesh holds
    # `reshard`s and sharding constraints).
    "sharding-constraint": lambda h, x: lax.with_sharding_constraint(
        jnp.tanh(h), jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ),
    "barrier": lambda h, x: lax.optimization_barrier((jnp.sin(h), x))[0],
}

#: The exact pattern of ∂out/∂h, where it is known (rows: outputs).
EXACT = {
    "narrow-clip": np.eye(4, dtype=bool),
    "custom-vjp-surrogate": np.eye(4, dtype=bool),
    "permutation": np.eye(4, dtype=bool)[[3, 0, 1, 2]],
    "cond": np.eye(4, dtype=bool),
    "fori-micro-steps": np.eye(4, dtype=bool),
    "roll": np.roll(np.eye(4, dtype=bool), 1, axis=0),
    "cumsum": np.tril(np.ones((4, 4), bool)),
    "while": np.eye(4, dtype=bool),
    "scatter-set": np.eye(4, dtype=bool)[[0, 3, 1, 2]],
    "sharding-constraint": np.eye(4, dtype=bool),
    "barrier": np.eye(4, dtype=bool),
    "generic-reduce": np.diag([True, True, True, False]),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_pattern_covers_every_numeric_nonzero(name):
    fun = FUNCTIONS[name]
    h, x = jnp.zeros(4), jnp.zeros(3)
    (leaves,) = pullback_pattern(fun, (h, x), (0,), identity_colours).leaves[:1]
    pattern = np.moveaxis(leaves[0], -1, 0)  # (out, in)
    rng = np.random.default_rng(0)
    points = [rng.normal(size=4) * scale for scale in (0.3, 1.0, 3.0) for _ in range(5)]
    points += [np.full(4, 0.975), np.full(4, 1.02), np.full(4, 0.01)]  # inside the bands
    for point in points:
        # Reverse mode where it exists (custom_vjp), forward mode for a `while_loop`.
        jacobian_of = jax.jacfwd if name == "while" else jax.jacrev
        jacobian = np.asarray(jacobian_of(fun)(jnp.asarray(point), jnp.asarray(point[:3])))
        missed = (jacobian != 0) & ~pattern
        assert not missed.any(), f"{name}: the pattern misses {np.argwhere(missed)[:4]}"
    if name in EXACT:
        np.testing.assert_array_equal(pattern, EXACT[name])


def test_patterns_are_the_same_inside_jit():
    # A plan is built inside the traced step; a trace is laid out outside. The walk's own
    # arrays (folded constants, 0/1 arrays through gathers and scatters) must be concrete in
    # both, or the pattern widens inside (SnAp-n's layout then differs between the two).
    h, x = jnp.zeros(4), jnp.zeros(3)
    outside = {
        name: pullback_pattern(fun, (h, x), (0,), identity_colours)
        for name, fun in FUNCTIONS.items()
    }
    inside = {}

    def analyse(scale, x):
        for name, fun in FUNCTIONS.items():
            inside[name] = pullback_pattern(fun, (h * scale, x), (0,), identity_colours)
        return jnp.sum(scale * x)

    jax.jit(analyse)(1.0, x)
    for name in FUNCTIONS:
        assert inside[name].unknown == outside[name].unknown, name
        np.testing.assert_array_equal(inside[name].leaves[0][0], outside[name].leaves[0][0], name)


def test_integer_fields_are_constants_only_when_known():
    mask = jnp.array([1, 0, 1, 0])

    def fun(h, mask):
        return h * mask

    known = pullback_pattern(fun, (jnp.zeros(4), mask), (0,), identity_colours, known=(1,))
    abstract = pullback_pattern(fun, (jnp.zeros(4), mask), (0,), identity_colours)
    np.testing.assert_array_equal(known.leaves[0][0], np.diag([True, False, True, False]))
    np.testing.assert_array_equal(abstract.leaves[0][0], np.eye(4, dtype=bool))


def test_an_unknown_primitive_is_a_dependence_and_named():
    pattern = pullback_pattern(
        lambda h: jnp.real(jnp.fft.ifft(jnp.fft.fft(h))), (jnp.zeros(4),), (0,), identity_colours
    )
    assert pattern.leaves[0][0].all()
    assert "fft" in pattern.unknown


def test_a_product_with_a_masked_weight_keeps_the_mask():
    # The weight's values are abstract, but `jnp.where(mask, w, 0)` is zero off the mask
    # whatever they are: the product reaches only the mask's entries (SnAp-n's banded masks).
    mask = np.abs(np.subtract.outer(np.arange(5), np.arange(5))) <= 1

    def fun(h, w, mask):
        return jnp.tanh(jnp.where(mask, w, 0) @ h) * 2

    (leaves,) = pullback_pattern(
        fun, (jnp.zeros(5), jnp.zeros((5, 5)), jnp.asarray(mask)), (0,), identity_colours, (2,)
    ).leaves
    np.testing.assert_array_equal(np.moveaxis(leaves[0], -1, 0), mask)
    # Without the mask known, every output depends on every input.
    (leaves,) = pullback_pattern(
        fun, (jnp.zeros(5), jnp.zeros((5, 5)), jnp.asarray(mask)), (0,), identity_colours
    ).leaves
    assert leaves[0].all()
