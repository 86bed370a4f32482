"""Running a cell with its synaptic ops observed: what the diagonal rules do every step.

Each op held by a cell is wrapped so that its calls go through a log: the `s`-th call of the
step (call site `s`) records its input vector and output, may have a probe added to its output
(whose derivative is `∂h/∂u`), may have its input cut from the derivative, and may replay a
recorded output instead of recomputing it. Calls are recorded with the index of the op that
made them, so call sites are paired with ops by identity, never by order.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend.core import get_opaque_trace_state

from ._ops import algebra, is_op


class _CallLog:
    """The op calls of one run of a cell under `probed_call`, in call order."""

    def __init__(self, probes, outputs, cut: bool, restricted=None):
        self.probes, self.outputs, self.cut = probes, outputs, cut
        self.restricted = restricted
        self.op_indices: list[int] = []
        self.records: list[tuple[jax.Array, jax.Array]] = []
        # The trace the cell runs in (set by `_wrap_ops`); a call in another one is inside a
        # transformation within the cell (`jax.vmap(self.op)`, a `lax.cond` branch), whose
        # records cannot leave it.
        self.trace_state: Any = None
        self.nested: list[int] = []  # the ops called in another trace
        # The leaves of each op as the cell holds it (set by `_wrap_ops`), and the ops called
        # with other leaves: an op rebuilt before its call (`eqx.nn.WeightNorm` calls a copy
        # of its layer holding `g v / |v|`; `eqx.tree_at` of its mask) computes with weights
        # or masks that are not the op's own, while the op traces read the op's own.
        self.held: dict[int, list[Any]] = {}
        self.rebuilt: list[int] = []

    def call(self, index: int, op: Any, raw_input: Any) -> jax.Array:
        if get_opaque_trace_state(convention="eqtrace") != self.trace_state:
            self.nested.append(index)
        elif index in self.held:
            arrays = jtu.tree_leaves(op)
            held = self.held[index]
            if len(arrays) != len(held) or any(a is not b for a, b in zip(arrays, held)):
                self.rebuilt.append(index)
        site = len(self.records)
        rules = algebra(op)
        a = rules.input(op, raw_input)
        path = None
        if self.cut:
            if self.restricted is not None and self.restricted[site] is not None:
                # Zero-valued, with the cut input's derivative through the restricted op.
                stopped = jax.lax.stop_gradient(a)
                path = self.restricted[site](op, stopped, a - stopped)
            a = jax.lax.stop_gradient(a)
        u = rules.apply(op, a) if self.outputs is None else self.outputs[site]
        if path is not None:
            u = u + path
        self.op_indices.append(index)
        self.records.append((a, u))
        probe = None if self.probes is None else self.probes[site]
        return u if probe is None else u + probe


class _Probed(eqx.Module):
    """Stands in for op number `index` of a cell during `probed_call`: calls go through the
    log; attribute reads (`op.weight`) reach the op, so that the analysis can see and report
    weights used outside a call."""

    op: Any
    index: int = eqx.field(static=True)
    log: _CallLog = eqx.field(static=True)

    def __getattr__(self, name):
        return getattr(self.op, name)

    def __call__(self, raw_input, *, key=None):
        del key
        return self.log.call(self.index, self.op, raw_input)


def _wrap_ops(cell, log: _CallLog):
    """`cell` with its ops logged by `log`; call it at once, in the trace it is wrapped in."""
    log.trace_state = get_opaque_trace_state(convention="eqtrace")
    counter = iter(range(len(find_ops(cell))))

    def probed(node):
        index = next(counter)
        log.held[index] = jtu.tree_leaves(node)
        return _Probed(node, index, log)

    return jtu.tree_map(lambda node: probed(node) if is_op(node) else node, cell, is_leaf=is_op)


def probed_call(
    cell, state, x, probes=None, *, cut: bool, outputs=None, sites=None, restricted=None
):
    """Runs `cell(state, x)` with `probes[s]` added to the output of its `s`-th op call; with
    `outputs` (recorded by an earlier call), the calls return those instead of recomputing
    them, so only the cell's element-wise part runs. With `sites` (the op index of each call,
    from the analysis), checks that the cell made exactly those calls. With `cut` and
    `restricted` (per call, `None` or a linear map `(op, a, δa) -> δu`), a cut input still
    reaches the output, through that map only (SnAp-1's self-paths).

    **Returns:** `(new_state, ((a_1, u_1), …))`, each call's input vector and output.
    """
    log = _CallLog(probes, outputs, cut, restricted)
    new_state, _ = _wrap_ops(cell, log)(state, x)
    if sites is not None and tuple(log.op_indices) != tuple(sites):
        raise ValueError(
            f"{type(cell).__name__}: its synaptic ops were called in the order "
            f"{log.op_indices} (by field position), but in {list(sites)} when it was analysed. "
            "The sequence of op calls in a step must not depend on values."
        )
    return new_state, tuple(log.records)


def call_sites(cell, state, x) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The op index of each op call in one step of `cell`, in call order; of the ops called
    inside a JAX transformation within the cell (`jax.vmap(self.op)`, a `lax.cond` branch or
    a `lax.scan` body); and of the ops called with arrays other than the ones the cell
    holds (rebuilt before the call, as `eqx.nn.WeightNorm` rebuilds its layer). Read
    from the arrays' identities while tracing the step, not from their values."""
    log = _CallLog(None, None, True)
    eqx.filter_eval_shape(lambda c, s, x: _wrap_ops(c, log)(s, x)[0], cell, state, x)
    return tuple(log.op_indices), tuple(sorted(set(log.nested))), tuple(sorted(set(log.rebuilt)))


def find_ops(cell) -> list[tuple[str, Any]]:
    """The synaptic ops held by `cell`, with their attribute paths, in traversal order."""
    leaves = jtu.tree_leaves_with_path(cell, is_leaf=is_op)
    return [(jtu.keystr(path), node) for path, node in leaves if is_op(node)]


def other_params_spec(cell, called: tuple[bool, ...]):
    """A filter spec selecting the floating arrays of `cell` that are not inside a called op
    (the arrays of an op that is never called are ordinary parameters)."""
    flags = iter(called)
    return jtu.tree_map(
        lambda n: (
            (not next(flags)) and eqx.is_inexact_array(n) if is_op(n) else eqx.is_inexact_array(n)
        ),
        cell,
        is_leaf=is_op,
    )


def called_ops_spec(cell, called: tuple[bool, ...]):
    """A filter spec selecting the floating arrays inside the called ops of `cell`."""
    flags = iter(called)
    return jtu.tree_map(
        lambda n: jtu.tree_map(eqx.is_inexact_array, n) if is_op(n) and next(flags) else False,
        cell,
        is_leaf=is_op,
    )


def concrete(tree):
    """`tree` with every `jax.ShapeDtypeStruct` replaced by zeros of its shape and dtype."""
    return jtu.tree_map(
        lambda a: jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a, tree
    )


def random_like(tree, rng: np.random.Generator, scale: float):
    """`tree` with its floating arrays drawn at random; integer and boolean arrays (a cell's
    masks, signs, delay tables) keep their own values where they are known (zeros where
    they are traced)."""

    def draw(leaf):
        if not eqx.is_array(leaf):
            return leaf  # Python scalars and other leaves are part of the structure.
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jnp.asarray(rng.normal(scale=scale, size=tuple(leaf.shape)), leaf.dtype)
        try:
            return jnp.asarray(np.asarray(leaf))
        except jax.errors.TracerArrayConversionError:
            return jnp.zeros(leaf.shape, leaf.dtype)

    return jtu.tree_map(draw, tree)
