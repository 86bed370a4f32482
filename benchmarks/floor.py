"""The trace-bandwidth floor of an online rule: one read-and-write pass over its batched trace
per step, and nothing else.

A rule that steps must read its whole trace and write the new one every step, so over `T`
steps it cannot be faster than this pass, whatever its arithmetic; a rule in online blocks
passes over the trace once per block and can go below it. The pass flips one bit of every
number (an XOR of the raw bits with a mask): the cheapest operation that still reads and writes
every byte, so the floor times the memory traffic and not, e.g., bfloat16 conversions. The
mask is an argument of the compiled call (XLA cannot fold it) and the trace is the carry of a
`lax.scan` (XLA cannot merge steps).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .algorithms import Algorithm, stepping
from .problems import Problem


_BITS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}  # by itemsize


def floor_name(algorithm: Algorithm) -> str:
    """The floor row of `algorithm`: named after the stepping configuration of its rule, whose
    trace (same rule, same dtype) a block configuration also carries."""
    return f"{stepping(algorithm).name} floor"


def floors(algorithms: Sequence[Algorithm]) -> dict[str, Algorithm]:
    """One floor per distinct trace among the online `algorithms`, by row name, in order."""
    return {floor_name(a): stepping(a) for a in algorithms if a.online}


def _flip(a: jax.Array, mask: jax.Array) -> jax.Array:
    # The exponent's top bit (the second-highest bit of any float): 0 and 2 alternate, never a
    # subnormal (flushed to zero on CPU) or a NaN.
    bits = _BITS[a.dtype.itemsize]
    flipped = jax.lax.bitcast_convert_type(a, bits) ^ (mask.astype(bits) << (8 * a.itemsize - 2))
    return jax.lax.bitcast_convert_type(flipped, a.dtype)


def make_floor(problem: Problem, algorithm: Algorithm) -> tuple[Callable, tuple]:
    """`(floor, args)`: `floor(*args)` runs `config.steps` passes over a batched trace of
    `algorithm`, shaped and typed as the one the rule carries, and returns it."""
    shapes = algorithm.batched_trace(problem)
    # Without PRNG keys (UORO's: 8 bytes per sample), which have no bits to flip.
    numbers = [
        s
        for s in jax.tree.leaves(shapes)
        if not jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key)
    ]
    trace = [jnp.zeros(s.shape, s.dtype) for s in numbers]

    def floor(trace: Any, mask: jax.Array) -> Any:
        def body(trace, _):
            return jax.tree.map(lambda a: _flip(a, mask), trace), None

        trace, _ = jax.lax.scan(body, trace, length=problem.config.steps)
        return trace

    return floor, (trace, jnp.asarray(1, jnp.uint8))
