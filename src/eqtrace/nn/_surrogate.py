import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _heaviside(x):
    return (x > 0).astype(x.dtype)


# The spike functions below are built as `jax.custom_jvp(function, nondiff_argnums=...)` rather
# than with decorators, so that the import-time type-checking hook (which wraps decorated
# functions) never wraps the `custom_jvp` object itself. The shape parameters are
# non-differentiable Python floats (`nondiff_argnums`), hence hashable and static.


def _sigmoid_primal(x, steepness):
    del steepness
    return _heaviside(x)


def _sigmoid_derivative(x, steepness):
    s = jax.nn.sigmoid(steepness * x)
    return steepness * s * (1 - s)


def _sigmoid_jvp(steepness, primals, tangents):
    (x,), (t,) = primals, tangents
    return _heaviside(x), _sigmoid_derivative(x, steepness) * t


_sigmoid = jax.custom_jvp(_sigmoid_primal, nondiff_argnums=(1,))
_sigmoid.defjvp(_sigmoid_jvp)


def _fast_sigmoid_primal(x, scale):
    del scale
    return _heaviside(x)


def _fast_sigmoid_derivative(x, scale):
    return 1 / (1 + scale * jnp.abs(x)) ** 2


def _fast_sigmoid_jvp(scale, primals, tangents):
    (x,), (t,) = primals, tangents
    return _heaviside(x), _fast_sigmoid_derivative(x, scale) * t


_fast_sigmoid = jax.custom_jvp(_fast_sigmoid_primal, nondiff_argnums=(1,))
_fast_sigmoid.defjvp(_fast_sigmoid_jvp)


def _triangle_primal(x, width, dampening):
    del width, dampening
    return _heaviside(x)


def _triangle_derivative(x, width, dampening):
    return (dampening / width) * jnp.maximum(0, 1 - jnp.abs(x) / width)


def _triangle_jvp(width, dampening, primals, tangents):
    (x,), (t,) = primals, tangents
    return _heaviside(x), _triangle_derivative(x, width, dampening) * t


_triangle = jax.custom_jvp(_triangle_primal, nondiff_argnums=(1, 2))
_triangle.defjvp(_triangle_jvp)


def _arctan_primal(x, alpha):
    del alpha
    return _heaviside(x)


def _arctan_derivative(x, alpha):
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * x) ** 2)


def _arctan_jvp(alpha, primals, tangents):
    (x,), (t,) = primals, tangents
    return _heaviside(x), _arctan_derivative(x, alpha) * t


_arctan = jax.custom_jvp(_arctan_primal, nondiff_argnums=(1,))
_arctan.defjvp(_arctan_jvp)


def _positive(name: str, value: float | int) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"surrogate: `{name}` must be a positive float, but received {value}.")
    return value


def heaviside(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """The Heaviside step `H(x) = 1 if x > 0 else 0` (with `H(0) = 0`), with zero derivative.

    This is the forward pass shared by every surrogate spike function; use the surrogates
    below when a gradient must flow through the spike.

    **Arguments:**

    - `x`: the distance to threshold.

    **Returns:** the spikes, `0.` or `1.`, in the dtype of `x`.
    """
    return _heaviside(x)


def sigmoid(x: Float[Array, "*shape"], steepness: float | int = 5.0) -> Float[Array, "*shape"]:
    """Heaviside step with the derivative of a logistic sigmoid.

    Forward: `H(x) = (x > 0)`. Derivative: `k σ(k x) (1 − σ(k x))`, with `k = steepness`
    (integrates to one).

    **Arguments:**

    - `x`: the distance to threshold.
    - `steepness`: `k`, a Python float (not differentiated).

    **Returns:** the spikes, `0.` or `1.`, in the dtype of `x`.
    """
    return _sigmoid(x, _positive("steepness", steepness))


def fast_sigmoid(x: Float[Array, "*shape"], scale: float | int = 10.0) -> Float[Array, "*shape"]:
    """Heaviside step with the SuperSpike derivative (Zenke & Ganguli, 2018).

    Forward: `H(x) = (x > 0)`. Derivative: `1 / (1 + scale |x|)²`, the derivative of the "fast
    sigmoid" `x / (1 + scale |x|)` up to a factor (it integrates to `2 / scale`).

    **Arguments:**

    - `x`: the distance to threshold.
    - `scale`: a Python float (not differentiated); larger is sharper.

    **Returns:** the spikes, `0.` or `1.`, in the dtype of `x`.
    """
    return _fast_sigmoid(x, _positive("scale", scale))


def triangle(
    x: Float[Array, "*shape"], width: float | int = 1.0, dampening: float | int = 0.3
) -> Float[Array, "*shape"]:
    """Heaviside step with the piecewise-linear pseudo-derivative of e-prop (Bellec et al.,
    2018 and 2020).

    Forward: `H(x) = (x > 0)`. Derivative: `(γ / w) max(0, 1 − |x| / w)`, with `w = width` and
    `γ = dampening` (it integrates to `γ`). With `x = (v − A) / v_th` and `w = 1` this is the
    paper's `γ_pd max(0, 1 − |(v − A) / v_th|)`.

    **Arguments:**

    - `x`: the distance to threshold.
    - `width`: half-width `w` of the triangle, a Python float (not differentiated).
    - `dampening`: peak height times width, `γ`, a Python float (not differentiated).

    **Returns:** the spikes, `0.` or `1.`, in the dtype of `x`.
    """
    return _triangle(x, _positive("width", width), _positive("dampening", dampening))


def arctan(x: Float[Array, "*shape"], alpha: float | int = 2.0) -> Float[Array, "*shape"]:
    """Heaviside step with the derivative of `arctan(π α x / 2) / π + 1/2` (Fang et al., 2021).

    Forward: `H(x) = (x > 0)`. Derivative: `(α / 2) / (1 + (π α x / 2)²)` (integrates to one).

    **Arguments:**

    - `x`: the distance to threshold.
    - `alpha`: `α`, a Python float (not differentiated); larger is sharper.

    **Returns:** the spikes, `0.` or `1.`, in the dtype of `x`.
    """
    return _arctan(x, _positive("alpha", alpha))


class AbstractSurrogate(eqx.Module):
    """A surrogate spike function: the Heaviside step forward, a smooth derivative backward.

    Spiking cells hold one as a static field (`surrogate=eqtrace.nn.surrogate.FastSigmoid()`).
    Surrogates are small frozen modules whose shape parameters are static Python floats, so they
    are hashable and compare by value: two cells with equal surrogates share compiled code.

    The derivative is defined with `jax.custom_jvp`, so it is used by forward mode (`jax.jvp`,
    needed by the online rules) and, transposed, by reverse mode (`jax.grad`) alike.

    To write your own, subclass this and implement `__call__` with a `jax.custom_jvp` whose
    forward is `(x > 0).astype(x.dtype)`, and `derivative`.
    """

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """The spikes `H(x)`, differentiated with the surrogate derivative."""

    @abc.abstractmethod
    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """The surrogate derivative at `x` (what `jax.grad` of `__call__` returns)."""


class Sigmoid(AbstractSurrogate):
    """The surrogate of [`eqtrace.nn.surrogate.sigmoid`][], with a fixed `steepness`."""

    steepness: float = eqx.field(static=True, default=5.0, converter=float)

    def __check_init__(self):
        _positive("steepness", self.steepness)

    def __call__(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _sigmoid(x, self.steepness)

    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _sigmoid_derivative(x, self.steepness)


class FastSigmoid(AbstractSurrogate):
    """The SuperSpike surrogate of [`eqtrace.nn.surrogate.fast_sigmoid`][], with a fixed
    `scale`."""

    scale: float = eqx.field(static=True, default=10.0, converter=float)

    def __check_init__(self):
        _positive("scale", self.scale)

    def __call__(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _fast_sigmoid(x, self.scale)

    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _fast_sigmoid_derivative(x, self.scale)


class Triangle(AbstractSurrogate):
    """The e-prop surrogate of [`eqtrace.nn.surrogate.triangle`][], with a fixed `width` and
    `dampening`."""

    width: float = eqx.field(static=True, default=1.0, converter=float)
    dampening: float = eqx.field(static=True, default=0.3, converter=float)

    def __check_init__(self):
        _positive("width", self.width)
        _positive("dampening", self.dampening)

    def __call__(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _triangle(x, self.width, self.dampening)

    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _triangle_derivative(x, self.width, self.dampening)


class Arctan(AbstractSurrogate):
    """The surrogate of [`eqtrace.nn.surrogate.arctan`][], with a fixed `alpha`."""

    alpha: float = eqx.field(static=True, default=2.0, converter=float)

    def __check_init__(self):
        _positive("alpha", self.alpha)

    def __call__(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _arctan(x, self.alpha)

    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _arctan_derivative(x, self.alpha)
