import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray


def parse_equation(equation: str) -> tuple[str, str, str]:
    """The subscripts `(input, weight, output)` of an equation `"a,w->u"`, checked: letters
    only, none twice in one operand, every output letter in an operand."""
    example = 'e.g. "i,oi->o" (dense), "gi,goi->go" (grouped) or "ti,oi->to" (shared over t)'
    if not isinstance(equation, str):
        raise TypeError(
            f"EinsumLinear: `equation` must be a str, but received {type(equation).__name__}; "
            f"{example}."
        )
    compact = equation.replace(" ", "")
    operands, arrow, output = compact.partition("->")
    parts = operands.split(",")
    if not arrow or len(parts) != 2:
        raise ValueError(
            f"EinsumLinear: `equation` must name two operands (the input, then the weight) and "
            f'the output explicitly, as `"input,weight->output"`, but received {equation!r}; '
            f"{example}."
        )
    a_subs, w_subs = parts
    for name, subs in (("input", a_subs), ("weight", w_subs), ("output", output)):
        if not all(c.isascii() and c.isalpha() for c in subs):
            raise ValueError(
                f"EinsumLinear: the {name} subscripts {subs!r} of `equation` {equation!r} must "
                "be letters (no ellipsis `...`, no digits): name every axis."
            )
        if len(set(subs)) != len(subs):
            raise ValueError(
                f"EinsumLinear: the {name} subscripts {subs!r} of `equation` {equation!r} repeat "
                "a letter (a diagonal), which this op does not take: give each axis its own "
                "letter."
            )
    missing = [c for c in output if c not in a_subs + w_subs]
    if missing:
        raise ValueError(
            f"EinsumLinear: the output letters {missing} of `equation` {equation!r} are in "
            "neither the input nor the weight subscripts; every output axis must come from one."
        )
    return a_subs, w_subs, output


def _sizes(equation, input_shape, weight_shape) -> dict[str, int]:
    a_subs, w_subs, _ = parse_equation(equation)
    sizes: dict[str, int] = {}
    for name, subs, shape in (
        ("input_shape", a_subs, input_shape),
        ("weight_shape", w_subs, weight_shape),
    ):
        if len(shape) != len(subs) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
        ):
            raise ValueError(
                f"EinsumLinear: `{name}` must be {len(subs)} positive ints, one per letter of "
                f"{subs!r} in `equation` {equation!r}, but received {shape!r}."
            )
        for c, s in zip(subs, shape):
            if sizes.setdefault(c, s) != s:
                raise ValueError(
                    f"EinsumLinear: axis {c!r} of `equation` {equation!r} must have one size in "
                    f"`input_shape` and `weight_shape`, but received {sizes[c]} in `input_shape` "
                    f"and {s} in `weight_shape`. Give a letter shared by both one size."
                )
    return sizes


class EinsumLinear(eqx.Module):
    """A synaptic op written as an einsum, `u = einsum(equation, a, W) + b`: any product of
    the input with a weight array that is linear in the weight (dense `"i,oi->o"`, grouped
    `"gi,goi->go"`, a weight shared over an axis `"ti,oi->to"`, a per-head map, …).

    The diagonal rules read from the equation which outputs each weight reaches. Where every
    output letter of size above 1 is a letter of the weight, each weight reaches one output
    and its trace is weight-shaped, `(*W.shape, K)` per sample, computed by einsums of the
    same equation; an output letter missing from the weight (`t` in `"ti,oi->to"`) shares
    each weight over that axis, and the weight's trace holds one value per (output reached,
    weight), `(colours, *W.shape, K)` (as a convolution's).

    **Arguments:**

    - `equation`: `"input,weight->output"` with explicit output, one letter per axis (no
      ellipsis, no repeated letter within an operand).
    - `input_shape`, `weight_shape`: the shapes of `a` and `W`, one size per letter (a
      letter shared by both has one size). The output's shape follows from them.
    - `use_bias`: whether to add a bias, shaped like the output.
    - `dtype`: parameter dtype (defaults to JAX's default float).
    - `key`: PRNG key for the uniform(±1/√fan_in) initialisation, `fan_in` the number of
      products summed into each output.
    """

    weight: Float[Array, "..."]
    bias: Float[Array, "..."] | None
    equation: str = eqx.field(static=True)
    input_shape: tuple[int, ...] = eqx.field(static=True)
    output_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        equation: str,
        input_shape: tuple[int, ...],
        weight_shape: tuple[int, ...],
        *,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        input_shape, weight_shape = tuple(input_shape), tuple(weight_shape)
        sizes = _sizes(equation, input_shape, weight_shape)
        a_subs, w_subs, u_subs = parse_equation(equation)
        dtype = jnp.result_type(float) if dtype is None else dtype
        fan_in = math.prod(sizes[c] for c in sizes if c not in u_subs)
        lim = 1 / math.sqrt(fan_in)
        output_shape = tuple(sizes[c] for c in u_subs)
        wkey, bkey = jr.split(key)
        self.weight = jr.uniform(wkey, weight_shape, dtype, -lim, lim)
        self.bias = jr.uniform(bkey, output_shape, dtype, -lim, lim) if use_bias else None
        self.equation = f"{a_subs},{w_subs}->{u_subs}"
        self.input_shape, self.output_shape = input_shape, output_shape

    def __call__(self, a: Float[Array, "..."]) -> Float[Array, "..."]:
        if a.shape != self.input_shape:
            raise ValueError(
                f"EinsumLinear({self.equation!r}): the input must have shape "
                f"{self.input_shape}, but received {a.shape}. Reshape it, or build the op with "
                f"`input_shape={a.shape}`."
            )
        u = jnp.einsum(self.equation, a, self.weight)
        return u if self.bias is None else u + self.bias
