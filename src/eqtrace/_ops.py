"""Synaptic ops: the sub-modules of a cell whose output is linear in their weights.

The diagonal rules recognise them structurally (by type, among a cell's fields), not by
interpreting the cell's jaxpr. Each kind says how to turn the op's raw input into the vector `a`
that the weights multiply, how to apply the op to such a vector (also to an input *trace*), and
whether every weight reaches exactly one output element (needed to spread a per-output vector
over the weights, as D-RTRL does).
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .nn._linear import Linear


def is_op(node: Any) -> bool:
    return isinstance(node, Linear | eqx.nn.Linear | eqx.nn.Conv | eqx.nn.Embedding)


def op_input(op: Any, raw_input: Any) -> jax.Array:
    """The vector the op's weights multiply (one-hot for an embedding's integer index)."""
    if isinstance(op, eqx.nn.Embedding):
        return jax.nn.one_hot(raw_input, op.num_embeddings, dtype=op.weight.dtype)
    return raw_input


def apply_op(op: Any, a: jax.Array) -> jax.Array:
    """The op on an input vector `a` as returned by `op_input` (or on a trace of such vectors)."""
    if isinstance(op, eqx.nn.Embedding):
        return a @ op.weight
    return op(a)


def weights_reach_one_output(op: Any) -> bool:
    """Whether each weight feeds a single output element (dense, embedding), so that a
    per-output vector can be spread over the weights. Convolutions share weights across
    positions and do not."""
    return not isinstance(op, eqx.nn.Conv)


def bias_of(op: Any) -> jax.Array | None:
    return getattr(op, "bias", None) if not isinstance(op, eqx.nn.Embedding) else None


def op_params(op: Any) -> Any:
    return eqx.filter(op, eqx.is_inexact_array)


def _with_weight_and_bias(params: Any, weight: jax.Array, bias: jax.Array) -> Any:
    params = eqx.tree_at(lambda p: p.weight, params, weight)
    if getattr(params, "bias", None) is not None:
        params = eqx.tree_at(lambda p: p.bias, params, bias)
    return params


# The next three are D-RTRL's per-op algebra for ops whose every weight reaches one output
# (dense, masked dense, embedding). They are written as broadcasts and element-wise products,
# not as VJPs/JVPs of the op, so that the whole trace update fuses into one pass over the trace.
# Extra axes (one per state leaf) trail the parameter axes: a trace is `(*W.shape, K)`.


def spread(op: Any, v: jax.Array) -> Any:
    """`B_o(v)`: the per-output vector `v` (shape `(*u_shape, *extra)`) spread over the op's
    parameters, `v[i]` on every weight of output `i`, as arrays that broadcast against them."""
    params = op_params(op)
    if isinstance(op, eqx.nn.Embedding):
        return eqx.tree_at(lambda p: p.weight, params, v[None])
    return _with_weight_and_bias(params, v[:, None], v)


def outer(op: Any, a: jax.Array, cotangent: jax.Array) -> Any:
    """`VJP_W[op(a; ·)](cotangent)` for a cotangent of shape `(*u_shape, *extra)`: the outer
    product of the cotangent with the op's input vector `a`, masked like the op."""
    params = op_params(op)
    extra = (1,) * (cotangent.ndim - 1)
    if isinstance(op, eqx.nn.Embedding):
        weight = a.reshape(-1, 1, *extra) * cotangent[None]
        return eqx.tree_at(lambda p: p.weight, params, weight)
    weight = cotangent[:, None] * a.reshape(1, -1, *extra)
    if getattr(op, "mask", None) is not None:
        weight = jnp.where(op.mask.reshape(*op.mask.shape, *extra), weight, 0)
    return _with_weight_and_bias(params, weight, cotangent)


def contract(op: Any, trace: Any, delta: Any) -> jax.Array:
    """`B_oᵀ(ε ⊙ δW)`: a weight-shaped trace times a parameter tangent, summed onto the op's
    outputs."""
    # einsum, not sum(ε * δW): under `jax.vmap` its transpose (the gradient, summed over the
    # batch) becomes one dot; a multiply-then-reduce over the major batch axis is an order of
    # magnitude slower on CPU.
    if isinstance(op, eqx.nn.Embedding):
        return jnp.einsum("vo,vo->o", trace.weight, delta.weight)
    out = jnp.einsum("oi,oi->o", trace.weight, delta.weight)
    if getattr(op, "bias", None) is not None:
        out = out + trace.bias * delta.bias
    return out


def outer_sum(op: Any, a: jax.Array, cotangent: jax.Array) -> Any:
    """`Σ_t outer(op, a_t, cotangent_t)` over a leading time axis, as one contraction over `t`
    (a matrix product) rather than `t` rank-one updates."""
    params = op_params(op)
    if isinstance(op, eqx.nn.Embedding):
        weight = jnp.einsum("tv,to...->vo...", a, cotangent)
        return eqx.tree_at(lambda p: p.weight, params, weight)
    weight = jnp.einsum("to...,ti->oi...", cotangent, a)
    if getattr(op, "mask", None) is not None:
        extra = (1,) * (cotangent.ndim - 2)
        weight = jnp.where(op.mask.reshape(*op.mask.shape, *extra), weight, 0)
    return _with_weight_and_bias(params, weight, jnp.sum(cotangent, axis=0))
