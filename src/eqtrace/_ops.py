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


def spread(op: Any, v: jax.Array, a: jax.Array) -> Any:
    """`B_o(v)`: the per-output vector `v` spread over the op's parameters (`v[i]` on every
    weight of output `i`), as the VJP of the op at an all-ones input shaped like `a`."""
    ones = jnp.ones_like(a)
    _, vjp = eqx.filter_vjp(lambda o: apply_op(o, ones), op)
    return vjp(v)[0]


def weight_vjp(op: Any, a: jax.Array, cotangent: jax.Array) -> Any:
    """`VJP_W[op(a; ·)](cotangent)`: the gradient of `⟨cotangent, op(a)⟩` for the op's params."""
    _, vjp = eqx.filter_vjp(lambda o: apply_op(o, a), op)
    return vjp(cotangent)[0]
