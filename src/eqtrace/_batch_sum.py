"""The contraction of a weight-shaped trace with a weight tangent, `Bᵀ(ε ⊙ δW)`, in a form whose
transpose under `jax.vmap` (the online gradient, summed over the batch) reads the trace in its
own layout.

A rule's derivative is `ε_t · δθ` per sample; reverse mode transposes it, and `jax.vmap` over
the batch sums the per-sample gradients, `∇W[o, i] = Σ_b ḡ[b, o] ε[b, o, i]`. Written as one
`einsum`, that sum is a matrix product batched over the outputs `o` and contracting the batch
axis `b`, which XLA computes only after copying the trace to `(o, b, i)` (a transposed read
and write of the whole trace, then the product's own read); written as a multiply and a
reduction over the major batch axis, XLA:CPU's reduction is an order of magnitude slower still.
Over a batch of at most `UNROLLED_BATCH` samples, `contract` instead gives the batched map as
one contraction per sample, so its transpose is a sum of `B` element-wise products, which XLA
fuses into one pass that reads the trace where it lies (benchmarks/README.md, "Profile").

The batch is seen through `jax.custom_batching.custom_vmap`: only its batching rule knows the
batch (`_batched` says when it is bound under the map itself). Values and gradients are those
of the `einsum` up to the order of the sum's terms. Only on a single CPU device (`_unrolls`);
elsewhere the `einsum` is kept as it was.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.custom_batching import custom_vmap

from ._ops import algebra


#: Batches of at most this many samples sum their per-sample gradients as `B` terms of one
#: element-wise pass; larger ones (and batches of other axes, e.g. steps mapped within a batch)
#: keep the batched product.
UNROLLED_BATCH = 128


def contract_op(
    op: Any, a: jax.Array, trace: Any, delta: Any, leaf: int | None = None
) -> jax.Array:
    """`algebra(op).contract(op, a, trace, delta)` (`a` gives the input's shape and dtype
    only), through `contract`; with `leaf`, of `trace[..., leaf]`."""
    arrays, static = eqx.partition(op, eqx.is_array)
    shape, dtype = a.shape, a.dtype

    def fn(trace, delta, arrays):
        op = eqx.combine(arrays, static)
        trace = jtu.tree_map(lambda e, d: e.astype(d.dtype), trace, delta)
        return algebra(op).contract(op, jnp.zeros(shape, dtype), trace, delta)

    return contract(fn, trace, delta, arrays, leaf)


def contract(
    fn: Callable[[Any, Any, Any], jax.Array],
    trace: Any,
    delta: Any,
    other: Any,
    leaf: int | None = None,
) -> jax.Array:
    """`fn(trace, delta, other)` (linear in `delta`), whose transpose over a batch of `trace`
    with `delta` and `other` shared is a sum of one element-wise product per sample. With
    `leaf`, `trace` holds every state leaf's trace on a trailing axis and `fn` gets that of
    leaf `leaf`: the slice is taken per sample, so that XLA fuses it into the sum instead of
    copying it out of the trace first."""
    if not (_unrolls() and _batched(trace)):
        return fn(_select(trace, leaf), delta, other)
    return _per_sample(fn, leaf)(trace, delta, other)


def _select(trace: Any, leaf: int | None) -> Any:
    return trace if leaf is None else jtu.tree_map(lambda e: e[..., leaf], trace)


def _unrolls() -> bool:
    """Whether to sum over the batch sample by sample: on a single CPU device. Elsewhere the
    batched product stays: a GPU's reduction over the batch axis needs no unrolling (not yet
    measured), and slicing a batch split over devices by GSPMD (which a trace cannot see)
    would gather it onto each of them. So a process's last bits depend on how many devices
    it has: a run resumes bit for bit on the same devices. A batch whose type says it is
    split (explicit sharding) keeps the product too (`_split`)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _batched(tree: Any) -> bool:
    """Whether the innermost transformation here is a `jax.vmap` that maps `tree`: then the
    batching rule of a `custom_vmap` function bound now runs at once. Under a differentiation
    inside the map (`jax.vmap(jax.grad(...))`, per-sample gradients), the function would be
    staged into the linear program instead, which JAX cannot transpose; so the answer is no
    there. JAX has no public query for the current transformation: this reads its tracing
    context, and answers no (the batched product) if that ever changes."""
    try:
        from jax._src import core  # noqa: PLC0415

        current = core.trace_ctx.trace
    except (ImportError, AttributeError):
        return False
    if type(current).__name__ != "BatchTrace":
        return False
    return any(getattr(leaf, "_trace", None) is current for leaf in jtu.tree_leaves(tree))


def _split(tree: Any) -> bool:
    """Whether the batch axis of `tree` is sharded over devices in its type (explicit
    sharding): slicing it per sample is not defined there, so the batched product stays."""
    for leaf in jtu.tree_leaves(tree):
        spec = getattr(getattr(jax.typeof(leaf), "sharding", None), "spec", None)
        if spec and spec[0] is not None:
            return True
    return False


def _per_sample(fn: Callable[[Any, Any, Any], jax.Array], leaf: int | None) -> Callable:
    @custom_vmap
    def per_sample(trace, delta, other):
        return fn(_select(trace, leaf), delta, other)

    @per_sample.def_vmap
    def rule(axis_size, in_batched, trace, delta, other):
        shared = not any(jtu.tree_leaves((in_batched[1], in_batched[2])))
        unrollable = shared and all(jtu.tree_leaves(in_batched[0])) and not _split(trace)
        if unrollable and axis_size <= UNROLLED_BATCH:
            return _unrolled(fn, leaf, axis_size)(trace, delta, other), True
        axes = [jtu.tree_map(lambda b: 0 if b else None, batched) for batched in in_batched]
        mapped = jax.vmap(lambda t, d, o: fn(_select(t, leaf), d, o), in_axes=tuple(axes))
        return mapped(trace, delta, other), True

    return per_sample


def _unrolled(fn: Callable, leaf: int | None, size: int) -> Callable:
    """`fn` of each of `size` samples of `trace` (and its leaf `leaf`), stacked: one
    contraction per sample, so that the transpose sums `size` element-wise products. `fn` is
    traced once and its operations replayed per sample, all under one `jax.jit`, which JAX
    differentiates and transposes as one call: tracing `fn` per sample, at the level of the
    surrounding transformations, costs seconds for a batch of 128."""

    def sample(e, b):
        if leaf is None:
            return jax.lax.index_in_dim(e, b, keepdims=False)
        start = (b, *[0] * (e.ndim - 2), leaf)
        piece = jax.lax.slice(e, start, (b + 1, *e.shape[1:-1], leaf + 1))
        return piece.reshape(e.shape[1:-1])

    @jax.jit
    def unrolled(trace, delta, other):
        leaves = jtu.tree_leaves(trace)
        closed = jax.make_jaxpr(fn)(
            _select(jtu.tree_map(lambda e: e[0], trace), leaf), delta, other
        )
        shared = jtu.tree_leaves((delta, other))
        rows = [
            jax.core.eval_jaxpr(
                closed.jaxpr, closed.consts, *[sample(e, b) for e in leaves], *shared
            )[0]
            for b in range(size)
        ]
        return jnp.stack(rows)

    return unrolled
