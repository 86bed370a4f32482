"""The weight traces of one call of a synaptic op, in the layout its structure gives.

D-RTRL's trace of a weight `w` for state leaf `k` is `dh^k_n/dw` along the paths that
leave `w` through the op's outputs and then stay within neuron `n`. An array whose every
weight reaches one output element (dense, embedding, grouped) has one such trace per weight:
it is weight-shaped, `(*W.shape, K)`, and the op's algebra (`OpAlgebra.spread`, `outer`,
`contract`, `outer_sum`) computes with it. An array whose weights reach several outputs (a
convolution's kernel, the `V` of `U (V a)`) keeps one trace per (output element reached,
weight), `(colours, *W.shape, K)` as its `Reach` lays them out (`_structure.Reach`): the
trace of the output `j = index[c, w]` sits at `[c, w]`, and moves by the per-neuron Jacobian
of `j`'s neuron. The sum of an array's traces over the outputs of one neuron is that
neuron's trace of the weight, so the gradient, `Σ_k Σ_j ḡ^k_{n(j)} ε[k, j, w]`, and the
derivative `ε · δθ` are the same sums in both layouts.

These functions take a call site's `reach` (per floating array of the op, `None` or a
`Reach`) and use the algebra for the weight-shaped arrays; for the others, `spread` and
`contract` are a gather and a scatter over the static `index`, and the immediate term is the
algebra's `outer_reached`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._ops import algebra, op_params
from ._structure import Reach


def _merge(op: Any, weight_shaped: Any, reached: list[jax.Array | None]) -> Any:
    """The op's parameter pytree with the arrays that have a `Reach` taken from `reached` and
    the others from the weight-shaped pytree (`None` if there are none)."""
    leaves, treedef = jtu.tree_flatten(op_params(op))
    base = jtu.tree_leaves(weight_shaped) if weight_shaped is not None else [None] * len(leaves)
    return jtu.tree_unflatten(
        treedef, [b if r is None else r for b, r in zip(base, reached, strict=True)]
    )


def all_weight_shaped(reach: tuple[Reach | None, ...]) -> bool:
    return all(r is None for r in reach)


def zeros(op: Any, reach: tuple[Reach | None, ...], num_leaves: int, dtype: Any) -> Any:
    """A zero trace: `(*W.shape, K)` per weight-shaped array, `(colours, *W.shape, K)` per
    array with a `Reach`; in `dtype` (or the array's own, if `None`)."""
    leaves, treedef = jtu.tree_flatten(op_params(op))
    return jtu.tree_unflatten(
        treedef,
        [
            jnp.zeros(
                (*w.shape, num_leaves) if r is None else (r.count, *w.shape, num_leaves),
                dtype or w.dtype,
            )
            for w, r in zip(leaves, reach if reach else (None,) * len(leaves))
        ],
    )


def _gather(r: Reach, v: jax.Array) -> jax.Array:
    """`v[j]` at `[c, w]` for `j = r.index[c, w]` (zero where none): a per-output array
    `(*u_shape, *extra)` laid out over an array's (output, weight) pairs."""
    u_ndim = r.colours.ndim
    flat = v.reshape(-1, *v.shape[u_ndim:])
    index = jnp.asarray(r.index)
    gathered = flat[jnp.maximum(index, 0)]
    valid = (index >= 0).reshape(*index.shape, *(1,) * (v.ndim - u_ndim))
    return jnp.where(valid, gathered, 0)


def spread(op: Any, reach: tuple[Reach | None, ...], a: jax.Array, v: jax.Array) -> Any:
    """A per-output array `v` (`(*u_shape, *extra)`) laid out over the traces: `v[i]` on
    every weight of output `i` (weight-shaped arrays, `OpAlgebra.spread`), `v[j]` on every
    pair `(j, w)` (the others)."""
    rules = algebra(op)
    if all_weight_shaped(reach):
        return rules.spread(op, a, v)
    base = rules.spread(op, a, v) if None in reach else None
    return _merge(op, base, [None if r is None else _gather(r, v) for r in reach])


def outer(op: Any, reach: tuple[Reach | None, ...], a: jax.Array, cotangent: jax.Array) -> Any:
    """The immediate term `cotangent[j] ∂u_j/∂W_w` in the traces' layout."""
    rules = algebra(op)
    if all_weight_shaped(reach):
        return rules.outer(op, a, cotangent)
    base = rules.outer(op, a, cotangent) if None in reach else None
    return _merge(op, base, list(rules.outer_reached(op, a, cotangent, reach)))


def outer_sum(op: Any, reach: tuple[Reach | None, ...], a: jax.Array, cotangent: jax.Array) -> Any:
    """`Σ_t outer(a_t, cotangent_t)` over a leading time axis."""
    rules = algebra(op)
    if all_weight_shaped(reach):
        return rules.outer_sum(op, a, cotangent)
    base = rules.outer_sum(op, a, cotangent) if None in reach else None
    per_step = jax.vmap(lambda a_t, c_t: list(rules.outer_reached(op, a_t, c_t, reach)))(
        a, cotangent
    )
    return _merge(op, base, [None if p is None else jnp.sum(p, axis=0) for p in per_step])


def contract(
    op: Any, reach: tuple[Reach | None, ...], a: jax.Array, trace: Any, delta: Any
) -> jax.Array:
    """`Σ_w ε[j, w] δW_w` onto each output `j` (shaped like the op's output): the transpose
    of `spread`, for a trace without its leaf axis."""
    rules = algebra(op)
    if all_weight_shaped(reach):
        return rules.contract(op, a, trace, delta)
    trace_leaves, treedef = jtu.tree_flatten(trace)
    delta_leaves = jtu.tree_leaves(delta)
    total = None
    if None in reach:
        # The weight-shaped arrays through the algebra; the others' terms are zero there.
        weight_shaped = jtu.tree_unflatten(
            treedef,
            [
                e if r is None else jnp.zeros_like(d)
                for e, d, r in zip(trace_leaves, delta_leaves, reach)
            ],
        )
        total = rules.contract(op, a, weight_shaped, delta)
    for e, d, r in zip(trace_leaves, delta_leaves, reach):
        if r is None:
            continue
        products = (e * d[None].astype(e.dtype)).reshape(-1)
        # Pairs without an output point past the end and are dropped (`-1` would wrap).
        index = np.where(r.index >= 0, r.index, r.colours.size).reshape(-1)
        outputs = (
            jnp.zeros(r.colours.size, products.dtype)
            .at[jnp.asarray(index)]
            .add(products, mode="drop")
        )
        outputs = outputs.reshape(r.colours.shape)
        total = outputs if total is None else total + outputs.astype(total.dtype)
    assert total is not None
    return total
