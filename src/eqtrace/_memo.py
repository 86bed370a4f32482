"""A memo for the structural analyses: each is a function of a cell's *structure* only.

The analyses (`_structure.analyse`, SnAp-1's input owners, OTTT's constant leak, SnAp-n's
mask) read the code of a step with every floating value abstract; what they depend on is the
pytree structure of `(cell, state, x)` (with the cell's static fields: its activations,
sizes, options), the shapes and dtypes of its arrays, the values of its integer and boolean
arrays (masks, sign vectors, delay tables) and its Python scalars. That is this memo's key,
so a result is reused only where the analysis would read exactly the same thing: a cell
rebuilt with new weights (a new key, a training step, a checkpoint) is not analysed again,
while a different mask, size or activation is. Whether an array is traced (a plan built
inside `jit`) is part of the key too, since a traced integer array is read as unknown.

Anything the key cannot hold exactly (an unhashable static field, a PRNG key array) skips
the memo: the analysis then runs afresh, as it would without one. `register_op` clears it,
since which fields are ops is part of what an analysis reads.
"""

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


_MAX_ENTRIES = 256  # Enough for every cell of a session; bounded, since keys hold functions.
_CACHES: list[collections.OrderedDict] = []

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


class _Unkeyable(Exception):
    """A part of the arguments the key cannot represent exactly."""


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, (jax.core.Tracer, jax.ShapeDtypeStruct)):
        return ("abstract", tuple(leaf.shape), np.dtype(leaf.dtype), _weak(leaf))
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        dtype = (
            np.dtype(leaf.dtype)
            if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            else None
        )
        if dtype is None:
            raise _Unkeyable  # A PRNG key: its values are not bytes we may compare.
        if jnp.issubdtype(dtype, jnp.inexact):
            return ("float", tuple(leaf.shape), dtype, _weak(leaf))
        return ("exact", tuple(leaf.shape), dtype, np.asarray(leaf).tobytes())
    if leaf is None or isinstance(leaf, (bool, int, float, complex, str)):
        return ("value", type(leaf), leaf)
    raise _Unkeyable  # Another object among the leaves: compared by identity at best.


def _weak(leaf: Any) -> bool:
    return bool(getattr(leaf, "weak_type", False))


def _key(args: tuple[Any, ...]) -> Any:
    leaves, treedef = jtu.tree_flatten(args)
    key = (treedef, tuple(_leaf_key(leaf) for leaf in leaves))
    hash(key)  # TypeError for an unhashable static field
    return key


def _holds_tracer(result: Any) -> bool:
    """Whether a tracer hides anywhere in `result` (dataclasses, containers, pytrees)."""
    if isinstance(result, jax.core.Tracer):
        return True
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return any(_holds_tracer(getattr(result, f.name)) for f in dataclasses.fields(result))
    if isinstance(result, (tuple, list)):
        return any(_holds_tracer(item) for item in result)
    if isinstance(result, dict):
        return any(_holds_tracer(item) for item in result.values())
    leaves = jtu.tree_leaves(result)
    return not (len(leaves) == 1 and leaves[0] is result) and any(map(_holds_tracer, leaves))


def structural_memo(num_keyed: int) -> Callable[[_Fn], _Fn]:
    """Memoises an analysis on its first `num_keyed` positional arguments (the cell, state and
    example input, and any option such as SnAp's `n`); the arguments after them must be
    functions of those (e.g. a `CellStructure` already analysed from them)."""

    def decorator(fn: _Fn) -> _Fn:
        cache: collections.OrderedDict = collections.OrderedDict()
        _CACHES.append(cache)

        @functools.wraps(fn)
        def memoised(*args):
            try:
                key = _key(args[:num_keyed])
                found = cache.get(key)
            except (_Unkeyable, TypeError, ValueError):  # ValueError: `==` of an array field
                return fn(*args)
            if found is None:
                found = fn(*args)  # A refusal raises: not stored.
                if not _holds_tracer(found):  # Tracers of one `jit` must not leak into another.
                    cache[key] = found
                    if len(cache) > _MAX_ENTRIES:
                        cache.popitem(last=False)
            else:
                cache.move_to_end(key)
            return found

        return memoised  # type: ignore[return-value]

    return decorator


def clear_structural_memos() -> None:
    """Forgets every memoised analysis (`register_op` calls it)."""
    for cache in _CACHES:
        cache.clear()
