"""Which outputs of a function can depend on which inputs, read from its code: the sparsity
pattern of a Jacobian, for every value of the inputs at once.

The function's pullback (`jax.vjp` of it, applied to a cotangent) is traced to a jaxpr with every
input abstract, and the jaxpr is walked once with each variable carrying a set of *colours*
instead of a value: a cotangent element starts with the colours its output element was given,
and each primitive passes on the union of the colours its result can depend on. The colours an
input's cotangent ends with are those of the outputs its derivative can reach.

Why the pullback, not the function: a surrogate spike is a step function in its primal (a
comparison, with no dependence at all) but has a derivative by its `custom_jvp` or `custom_vjp`
rule; in the pullback those rules are the code that runs. Why not sampled Jacobians: a
derivative that vanishes on part of the inputs (a ReLU, `jnp.clip` to a narrow band, a
`jnp.where` on a regime, a narrow surrogate) hides a dependence from any finite set of draws.

Conservative by construction: a primitive without a rule here makes every element of its
results depend on every element of its operands (and is named in `Pattern.unknown`), so a gap
can only make a structure look denser, never drop a dependence. Integer and boolean arrays are
not differentiated; those held by the function's arguments are known constants (a Dale's-law
sign vector, a mask, a delay table), which makes `jnp.where`, products and gathers on them
exact. Nothing else about values is used.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend import core as jcore


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Per differentiated argument, per floating leaf, a boolean array `(*leaf.shape, C)`: the
    colours of the outputs that the leaf can reach; and the primitives the walk did not know
    (each made its results depend on all its operands)."""

    leaves: tuple[tuple[np.ndarray, ...], ...]
    unknown: tuple[str, ...]


def pullback_pattern(
    fun: Callable[..., Any],
    args: Sequence[Any],
    wrt: Sequence[int],
    colours: Callable[[list[jax.ShapeDtypeStruct]], list[np.ndarray]],
    known: Sequence[int] = (),
) -> Pattern:
    """The colours of `fun(*args)`'s floating outputs that each floating leaf of `args[i]`,
    `i` in `wrt`, can reach (leaves in `jax.tree.leaves(args[i])` order, `wrt` in order).
    `colours(outputs)` takes the floating output leaves and returns, per leaf, a boolean
    array `(*leaf.shape, C)`.

    Every floating leaf is abstract. Integer and boolean leaves of `args[i]`, `i` in `known`,
    are constants at their values (a cell's sign vectors and masks); all others abstract."""
    flat, treedef = jtu.tree_flatten(list(args))
    arg_of = jtu.tree_leaves([jtu.tree_map(lambda _, i=i: i, arg) for i, arg in enumerate(args)])
    abstract = [
        _is_array(leaf) and (_is_floating(leaf) or i not in known) for leaf, i in zip(flat, arg_of)
    ]
    free = [
        jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for leaf, a in zip(flat, abstract) if a
    ]
    free_wrt = [i in wrt and _is_floating(leaf) for leaf, i, a in zip(flat, arg_of, abstract) if a]
    order = [
        i for i, leaf, a in zip(arg_of, flat, abstract) if a and i in wrt and _is_floating(leaf)
    ]

    def rebuild(free_leaves):
        it = iter(free_leaves)
        return jtu.tree_unflatten(
            treedef, [next(it) if a else leaf for leaf, a in zip(flat, abstract)]
        )

    def floating_outputs(free_leaves):
        out = fun(*rebuild(free_leaves))
        return [leaf for leaf in jtu.tree_leaves(out) if jnp.issubdtype(leaf.dtype, jnp.inexact)]

    outputs = jax.eval_shape(floating_outputs, free)
    seeds = [np.asarray(c, bool) for c in colours(outputs)]
    num_colours = seeds[0].shape[-1] if seeds else 1

    def of_wrt(free_leaves, wrt_leaves):
        it = iter(wrt_leaves)
        return floating_outputs([next(it) if w else leaf for leaf, w in zip(free_leaves, free_wrt)])

    def pulled(free_leaves, cotangents):
        wrt_leaves = [leaf for leaf, w in zip(free_leaves, free_wrt) if w]
        _, pullback = jax.vjp(lambda w: of_wrt(free_leaves, w), wrt_leaves)
        return pullback(cotangents)[0]

    wrt_avals = [s for s, w in zip(free, free_wrt) if w]
    walk = _Walk(num_colours)
    try:
        closed = jax.make_jaxpr(pulled)(free, outputs)
    except Exception as reverse_error:  # noqa: BLE001 - e.g. a `while_loop`: forward mode
        try:
            leaves = _forward_pattern(of_wrt, free, wrt_avals, outputs, seeds, walk)
        except Exception:  # noqa: BLE001 - say why reverse mode failed, the usual path
            raise reverse_error from None
    else:
        inputs = [None] * len(free) + [_nonempty(s) for s in seeds]
        results = walk.closed(closed, inputs, [None] * len(inputs))
        leaves = tuple(
            np.zeros((*a.shape, num_colours), bool)
            if r is None
            else np.broadcast_to(r, (*a.shape, num_colours))
            for r, a in zip(results, wrt_avals)
        )
    per_arg = tuple(tuple(leaf for leaf, i in zip(leaves, order) if i == arg) for arg in wrt)
    return Pattern(leaves=per_arg, unknown=tuple(sorted(walk.unknown)))


def _forward_pattern(of_wrt, free, wrt_avals, outputs, seeds, walk):
    """The same result from the JVP instead, for functions reverse mode cannot trace (a
    `lax.while_loop`): each differentiated input element gets a colour of its own, the walk
    gives the exact pattern `(out, in)`, and each input then takes the output colours it
    reaches."""
    sizes = [int(np.prod(a.shape, dtype=np.int64)) for a in wrt_avals]
    total = sum(sizes)

    def jvp_of(free_leaves, wrt_leaves, tangents):
        return jax.jvp(lambda w: of_wrt(free_leaves, w), (wrt_leaves,), (tangents,))[1]

    closed = jax.make_jaxpr(jvp_of)(free, wrt_avals, wrt_avals)
    seeds_in, start = [], 0
    for a, size in zip(wrt_avals, sizes):
        seed = np.zeros((size, total), bool)
        seed[np.arange(size), start + np.arange(size)] = True
        seeds_in.append(seed.reshape(*a.shape, total))
        start += size
    forward = _Walk(total)
    inputs = [None] * (len(free) + len(wrt_avals)) + seeds_in
    results = forward.closed(closed, inputs, [None] * len(inputs))
    walk.unknown.update(forward.unknown)
    # `reach[out_element, in_element]`, then each input's colours: those of its outputs.
    reach = np.concatenate(
        [
            np.zeros((int(np.prod(o.shape, dtype=np.int64)), total), bool)
            if r is None
            else np.broadcast_to(r, (*o.shape, total)).reshape(-1, total)
            for r, o in zip(results, outputs)
        ]
    )
    colours = np.concatenate([s.reshape(-1, s.shape[-1]) for s in seeds])
    per_input = (reach.T.astype(np.int32) @ colours.astype(np.int32)) > 0
    leaves, start = [], 0
    for a, size in zip(wrt_avals, sizes):
        leaves.append(per_input[start : start + size].reshape(*a.shape, -1))
        start += size
    return tuple(leaves)


def identity_colours(outputs: list[jax.ShapeDtypeStruct]) -> list[np.ndarray]:
    """A colour per output element, in the order of the outputs' flat elements: the walk
    then gives the exact Jacobian pattern."""
    sizes = [int(np.prod(o.shape, dtype=np.int64)) for o in outputs]
    total, start, out = sum(sizes), 0, []
    for o, size in zip(outputs, sizes):
        seed = np.zeros((size, total), bool)
        seed[np.arange(size), start + np.arange(size)] = True
        out.append(seed.reshape(*o.shape, total))
        start += size
    return out


def one_colour(outputs: list[jax.ShapeDtypeStruct]) -> list[np.ndarray]:
    """One colour for every output: the walk then tells which inputs reach any output."""
    return [np.ones((*o.shape, 1), bool) for o in outputs]


def jacobian_pattern(pattern_leaf: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """An identity-coloured leaf `(*in_shape, |out|)` as `jax.jacrev` lays out a Jacobian:
    `(*out_shape, *in_shape)`."""
    moved = np.moveaxis(pattern_leaf, -1, 0)
    return moved.reshape(*out_shape, *pattern_leaf.shape[:-1])


def _support_of(value):
    """The elements of a known value that are not zero (`None` if it is not numeric)."""
    try:
        return np.asarray(value) != 0
    except Exception:  # noqa: BLE001 - e.g. a PRNG key
        return None


def _nonempty(deps):
    return deps if deps.any() else None


# The walk. Each variable holds `None` (depends on no colour) or a boolean array of its shape
# plus a trailing colour axis; variables whose value is known (constants, and what is computed
# from constants alone) also hold that value, which makes selections and products exact.


_ELEMENTWISE = frozenset(
    """abs acos acosh add add_any asin asinh atan atan2 atanh cbrt ceil clamp complex conj
    convert_element_type copy copy_p cos cosh digamma div erf erf_inv erfc exp exp2 expm1 floor
    imag integer_pow is_finite lgamma log log1p logistic max min mul ne neg nextafter pow
    real reduce_precision rem round rsqrt sign sin sinh sqrt square sub tan tanh
    eq lt le gt ge and or not xor select_n stop_gradient""".split()
)
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split()
)
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
# Linear maps of one operand's positions whose positions do not depend on values, applied to
# the colour arrays with the primitive itself (batched over the colour axis).
_POSITIONAL = frozenset(
    "pad rev gather dynamic_slice dynamic_update_slice scatter-add scatter".split()
)
_NO_DEPENDENCE = frozenset("iota random_bits random_seed random_wrap random_unwrap".split())
# Each result is its operand, placed or fenced differently (shardings, devices, barriers).
_IDENTITIES = frozenset(
    "reshard sharding_constraint device_put mesh_cast optimization_barrier pvary".split()
)


class _Walk:
    def __init__(self, num_colours: int):
        self.num_colours = num_colours
        self.unknown: set[str] = set()

    # Jaxprs.

    def closed(self, closed, deps, values):
        consts = [np.asarray(c) if _is_concrete(c) else None for c in closed.consts]
        # The walk computes with constants (folding, 0/1 arrays through positional ops and
        # convolutions; every walk starts here): eagerly, whatever transformation traces
        # around it, so that the pattern of a cell is the same analysed inside `jit` or `grad`
        # as outside (an array made under an outer trace would be a tracer, an unknown value,
        # and widen the pattern).
        with jax.ensure_compile_time_eval():
            return self.jaxpr(
                closed.jaxpr, [None] * len(consts) + list(deps), consts + list(values)
            )

    def jaxpr(self, jaxpr, deps, values):
        return self.jaxpr_values(jaxpr, deps, values)[0]

    def jaxpr_values(self, jaxpr, deps, values, supports=None):
        """Like `jaxpr`, also returning the known output values."""
        return self.jaxpr_supports(jaxpr, deps, values, supports)[:2]

    def jaxpr_supports(self, jaxpr, deps, values, supports=None):
        """Like `jaxpr_values`, also returning the outputs' supports (see `_supports`)."""
        env_deps, env_values, env_supports = {}, {}, {}
        invars = [*jaxpr.constvars, *jaxpr.invars]
        supports = [None] * len(invars) if supports is None else supports
        for var, d, v, z in zip(invars, deps, values, supports):
            env_deps[var], env_values[var], env_supports[var] = d, v, z

        def read(atom):
            if isinstance(atom, jcore.Literal):
                value = np.asarray(atom.val)
                return None, value, _support_of(value)
            value = env_values.get(atom)
            if value is not None:
                return env_deps.get(atom), value, _support_of(value)
            return env_deps.get(atom), None, env_supports.get(atom)

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            in_supports = [z for _, _, z in ins]
            out_deps, out_values = self.eqn(
                eqn, [d for d, _, _ in ins], [v for _, v, _ in ins], in_supports
            )
            if _sub_jaxpr(eqn) is not None and eqn.primitive.name not in ("cond", "scan", "while"):
                out_supports = self.call_supports  # a call: its jaxpr's, as `eqn` walked it
            else:
                out_supports = self.supports(eqn, [v for _, v, _ in ins], in_supports)
            for var, d, v, z in zip(eqn.outvars, out_deps, out_values, out_supports):
                env_deps[var], env_values[var], env_supports[var] = d, v, z
        outs = [read(a) for a in jaxpr.outvars]
        return [d for d, _, _ in outs], [v for _, v, _ in outs], [z for _, _, z in outs]

    def supports(self, eqn, values, supports):
        """The *supports* of an equation's results whose values are not known: boolean arrays
        of the elements that can be non-zero for some value of the inputs (`None`: any). A
        weight under a known mask (`jnp.where(mask, w, 0)`) has the mask as its support, so a
        product with it reaches only the mask's entries though its values are abstract.
        Followed through the few primitives between a mask and its product (the rest give
        `None`); known values give their own non-zeros where they are read."""
        name = eqn.primitive.name
        out = [None] * len(eqn.outvars)
        if len(eqn.outvars) != 1:
            return out
        shape = eqn.outvars[0].aval.shape
        try:
            if name == "select_n" and values[0] is not None:
                which = np.broadcast_to(values[0].astype(np.int32), shape)
                support = np.zeros(shape, bool)
                for case, z in enumerate(supports[1:]):
                    z = np.ones(shape, bool) if z is None else np.broadcast_to(z, shape)
                    support |= z & (which == case)
                return [support]
            if name == "mul":
                known = [np.broadcast_to(z, shape) for z in supports if z is not None]
                return [np.logical_and.reduce(known)] if known else out
            if name in ("add", "sub", "add_any") and all(z is not None for z in supports):
                return [np.broadcast_to(supports[0], shape) | np.broadcast_to(supports[1], shape)]
            z = supports[0] if supports else None
            if z is None:
                return out
            if name in ("neg", "convert_element_type", "copy", "copy_p", "reduce_precision"):
                return [np.broadcast_to(z, shape)]
            if name in _IDENTITIES or name in ("reshape", "squeeze", "expand_dims"):
                return [np.reshape(np.broadcast_to(z, eqn.invars[0].aval.shape), shape)]
            if name == "transpose":
                return [
                    np.transpose(
                        np.broadcast_to(z, eqn.invars[0].aval.shape), eqn.params["permutation"]
                    )
                ]
            if name == "broadcast_in_dim":
                dims = eqn.params["broadcast_dimensions"]
                expanded = np.expand_dims(
                    np.broadcast_to(z, eqn.invars[0].aval.shape),
                    [i for i in range(len(shape)) if i not in dims],
                )
                return [np.broadcast_to(expanded, shape)]
        except Exception:  # noqa: BLE001 - a support not followed is only less exact
            return out
        return out

    # Equations.

    def eqn(self, eqn, deps, values, supports=None):
        name = eqn.primitive.name
        # Read by the rules of products (`mul`, `dot_general`); a call's outputs' supports
        # are left in `call_supports`.
        self.in_supports = [None] * len(deps) if supports is None else supports
        self.call_supports = [None] * len(eqn.outvars)
        out_avals = [v.aval for v in eqn.outvars]
        sub = _sub_jaxpr(eqn)
        calls = sub is not None and name not in ("cond", "scan", "while")
        if all(d is None for d in deps) and not calls:
            # Nothing to carry; evaluate if every operand is known (constant folding).
            return [None] * len(out_avals), self.fold(eqn, values)
        if calls:
            closed, offset = sub
            inner_deps, inner_values, self.call_supports = self.jaxpr_supports(
                closed.jaxpr,
                [None] * len(closed.consts) + deps[offset:],
                [np.asarray(c) if _is_concrete(c) else None for c in closed.consts]
                + values[offset:],
                [None] * len(closed.consts) + list(self.in_supports[offset:]),
            )
            if offset:  # operands before the jaxpr's own (none for the calls handled here)
                extra = _union_all(deps[:offset], self.num_colours)
                inner_deps = [
                    _union(d, _full(extra, a.shape)) for d, a in zip(inner_deps, out_avals)
                ]
            return inner_deps, inner_values
        try:
            out = self.rule(eqn, deps, values)
        except Exception:  # noqa: BLE001 - a rule that fails is a gap, handled as one
            out = None
        if out is None:
            # Not known (or its rule failed): every result element depends on every operand
            # element.
            self.unknown.add(name)
            everything = _union_all(deps, self.num_colours)
            out = [_full(everything, a.shape) for a in out_avals]
        return out, [None] * len(out_avals)

    def rule(self, eqn, deps, values):
        """The colours of the results of a primitive with a rule here, or `None`."""
        name = eqn.primitive.name
        handler = getattr(self, "_" + name.replace("-", "_"), None)
        if handler is not None:
            return handler(eqn, deps, values)
        if name in _ELEMENTWISE:
            return [self.elementwise(eqn, deps, values)]
        if name in _REDUCTIONS:
            return [_any(deps[0], tuple(eqn.params["axes"]))]
        if name in _CUMULATIVE:
            return [_cumulative(deps[0], eqn.params["axis"], eqn.params["reverse"])]
        if name in _POSITIONAL:
            return [self.positional(eqn, deps, values)]
        if name in _NO_DEPENDENCE:
            return [None] * len(eqn.outvars)
        if name in _IDENTITIES:
            return list(deps[: len(eqn.outvars)])
        return None

    def fold(self, eqn, values):
        out = [None] * len(eqn.outvars)
        if any(v is None for v in values) or _sub_jaxpr(eqn) is not None:
            return out
        if any(getattr(v.aval, "size", 2**31) > 2**16 for v in eqn.outvars):
            return out  # not worth keeping
        try:
            result = _bind(eqn.primitive, eqn.params, values)
        except Exception:  # a primitive that cannot run eagerly: its value is just unknown
            return out
        results = result if eqn.primitive.multiple_results else [result]
        return [np.asarray(r) for r in results]

    def elementwise(self, eqn, deps, values):
        shape = eqn.outvars[0].aval.shape
        name = eqn.primitive.name
        if name == "select_n" and values[0] is not None:
            # A known predicate picks one case per element.
            which = np.broadcast_to(values[0].astype(np.int32), shape)
            out = None
            for case, d in enumerate(deps[1:]):
                if d is not None:
                    out = _union(out, _full(d, shape) & (which == case)[..., None])
            return out
        if name == "mul":
            # A known zero factor cuts the dependence through the other factor.
            masked = []
            for i, d in enumerate(deps):
                other = values[1 - i]
                support = _support_of(other) if other is not None else self.in_supports[1 - i]
                if d is not None and support is not None:
                    d = _full(d, shape) & np.broadcast_to(support, shape)[..., None]
                masked.append(d)
            deps = masked
        out = None
        for d in deps:
            if d is not None:
                out = _union(out, _full(d, shape))
        return out

    def positional(self, eqn, deps, values):
        """`pad`, `rev`, `gather`, `scatter`, `dynamic_slice`, …: positions that do not depend
        on values (indices known, or none) are mapped exactly by running the primitive on
        0/1 arrays, batched over the colour axis; unknown indices make each result element
        depend on every element of the operands it could come from."""
        name = eqn.primitive.name
        index_positions = {
            "gather": [1],
            "dynamic_slice": list(range(1, len(deps))),
            "dynamic_update_slice": list(range(2, len(deps))),
            "scatter-add": [1],
            "scatter": [1],
            "pad": [],
            "rev": [],
        }[name]
        if any(values[i] is None for i in index_positions):
            everything = _union_all(deps, self.num_colours)
            return _full(everything, eqn.outvars[0].aval.shape)
        carried = [i for i in range(len(deps)) if i not in index_positions]
        if name == "scatter":  # an overwrite: conservatively, the operand's colours stay too
            operand = deps[0]
            added = self._batched(eqn, "scatter-add", deps, values, carried)
            return _union(None if operand is None else _full(operand, operand.shape[:-1]), added)
        return self._batched(eqn, name, deps, values, carried)

    def _batched(self, eqn, name, deps, values, carried):
        params = dict(eqn.params)
        primitive = eqn.primitive
        avals = [v.aval for v in eqn.invars]
        operands, axes = [], []
        for i, aval in enumerate(avals):
            if i in carried:
                d = deps[i]
                d = np.zeros((*aval.shape, self.num_colours), bool) if d is None else d
                # 0/1 in the operand's own dtype (the primitive's reduction regions expect it).
                dtype = aval.dtype if jnp.issubdtype(aval.dtype, jnp.inexact) else jnp.float32
                operands.append(
                    jnp.asarray(np.broadcast_to(d, (*aval.shape, self.num_colours)), dtype)
                )
                axes.append(aval.ndim)
            else:
                operands.append(jnp.asarray(values[i]))
                axes.append(None)

        def apply(*ops):
            if name == "scatter-add" and primitive.name == "scatter":
                # An overwrite, counted as a sum through the public API (same parameters).
                operand, indices, updates = ops
                return jax.lax.scatter_add(
                    operand,
                    indices,
                    updates,
                    params["dimension_numbers"],
                    indices_are_sorted=params["indices_are_sorted"],
                    unique_indices=params["unique_indices"],
                    mode=params["mode"],
                )
            return _bind(primitive, params, ops)

        out = jax.vmap(apply, in_axes=axes, out_axes=-1)(*operands)
        return _nonempty(np.asarray(out) > 0)

    # Structural primitives, on the colour arrays with NumPy.

    def _broadcast_in_dim(self, eqn, deps, values):
        d = deps[0]
        if d is None:
            return [None]
        shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        expanded = np.expand_dims(d, [i for i in range(len(shape)) if i not in dims])
        return [np.broadcast_to(expanded, (*shape, d.shape[-1]))]

    def _reshape(self, eqn, deps, values):
        d = deps[0]
        if d is None:
            return [None]
        shape = eqn.outvars[0].aval.shape
        return [np.reshape(_full(d, eqn.invars[0].aval.shape), (*shape, d.shape[-1]))]

    def _squeeze(self, eqn, deps, values):
        return self._reshape(eqn, deps, values)

    def _expand_dims(self, eqn, deps, values):
        return self._reshape(eqn, deps, values)

    def _transpose(self, eqn, deps, values):
        d = deps[0]
        if d is None:
            return [None]
        perm = tuple(eqn.params["permutation"])
        return [np.transpose(_full(d, eqn.invars[0].aval.shape), (*perm, len(perm)))]

    def _slice(self, eqn, deps, values):
        d = _full(deps[0], eqn.invars[0].aval.shape)
        strides = eqn.params["strides"] or (1,) * len(eqn.params["start_indices"])
        index = tuple(
            slice(s, e, st)
            for s, e, st in zip(eqn.params["start_indices"], eqn.params["limit_indices"], strides)
        )
        return [d[index]]

    def _concatenate(self, eqn, deps, values):
        pieces = [
            np.zeros((*v.aval.shape, self.num_colours), bool)
            if d is None
            else _full(d, v.aval.shape)
            for d, v in zip(deps, eqn.invars)
        ]
        return [np.concatenate(pieces, axis=eqn.params["dimension"])]

    def _stack(self, eqn, deps, values):
        # `jnp.stack` (and the reverse pass of `jnp.unstack`): each operand at its index of
        # the new axis.
        axis = eqn.params["axis"]
        pieces = [
            np.zeros((*v.aval.shape, self.num_colours), bool)
            if d is None
            else _full(d, v.aval.shape)
            for d, v in zip(deps, eqn.invars)
        ]
        return [np.stack(pieces, axis=axis)]

    def _split(self, eqn, deps, values):
        d = _full(deps[0], eqn.invars[0].aval.shape)
        axis = eqn.params["axis"]
        bounds = np.cumsum(eqn.params["sizes"])[:-1]
        return list(np.split(d, bounds, axis=axis))

    def _unstack(self, eqn, deps, values):
        d = _full(deps[0], eqn.invars[0].aval.shape)
        axis = eqn.params["axis"]
        return [np.take(d, i, axis=axis) for i in range(d.shape[axis])]

    def _dot_general(self, eqn, deps, values):
        (contract_a, contract_b), (batch_a, batch_b) = eqn.params["dimension_numbers"]
        a_shape, b_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        free_a = [i for i in range(len(a_shape)) if i not in contract_a and i not in batch_a]
        free_b = [i for i in range(len(b_shape)) if i not in contract_b and i not in batch_b]

        def canonical(x, shape, batch, free, contract, free_last):
            # To (batch, free, contract) for `a` and (batch, contract, free) for `b`.
            order = [*batch, *free, *contract] if not free_last else [*batch, *contract, *free]
            trailing = x.shape[len(shape) :]
            x = np.transpose(x, [*order, *range(len(shape), x.ndim)])

            def size(dims):
                return int(np.prod([shape[i] for i in dims], dtype=np.int64))

            sizes = (
                (size(batch), size(free), size(contract))
                if not free_last
                else (size(batch), size(contract), size(free))
            )
            return x.reshape(*sizes, *trailing)

        def mask(i, shape):
            support = _support_of(values[i]) if values[i] is not None else self.in_supports[i]
            if support is None:
                return np.ones(shape, np.float32)
            return np.broadcast_to(support, shape).astype(np.float32)

        out_shape = eqn.outvars[0].aval.shape
        b_size = int(np.prod([a_shape[i] for i in batch_a], dtype=np.int64))
        fa = int(np.prod([a_shape[i] for i in free_a], dtype=np.int64))
        fb = int(np.prod([b_shape[i] for i in free_b], dtype=np.int64))
        # Each operand as (batch, free, contract) for `a` or (batch, contract, free) for `b`.
        lay_a = lambda x: canonical(x, a_shape, batch_a, free_a, contract_a, False)  # noqa: E731
        lay_b = lambda x: canonical(x, b_shape, batch_b, free_b, contract_b, True)  # noqa: E731
        out = np.zeros((b_size, fa, fb, self.num_colours), bool)
        if deps[0] is not None:
            da = lay_a(_full(deps[0], a_shape).astype(np.float32))
            out |= np.einsum("bfjc,bjg->bfgc", da, lay_b(mask(1, b_shape))) > 0
        if deps[1] is not None:
            db = lay_b(_full(deps[1], b_shape).astype(np.float32))
            out |= np.einsum("bfj,bjgc->bfgc", lay_a(mask(0, a_shape)), db) > 0
        return [out.reshape(*out_shape, self.num_colours)]

    def _conv_general_dilated(self, eqn, deps, values):
        # Bilinear, like `dot_general`: the colours of one operand reach the result through
        # the convolution itself, run on 0/1 arrays batched over the colour axis with the
        # other operand replaced by its support (every element, if not known). Which output
        # positions a kernel weight reaches is then exact, padding and strides included.
        avals = [v.aval for v in eqn.invars]
        params = {**eqn.params, "preferred_element_type": None}

        def operand(i):
            support = _support_of(values[i]) if values[i] is not None else self.in_supports[i]
            full = np.ones(avals[i].shape, bool) if support is None else support
            return jnp.asarray(np.broadcast_to(full, avals[i].shape), jnp.float32)

        out = None
        for i, d in enumerate(deps):
            if d is None:
                continue
            colours = jnp.asarray(_full(d, avals[i].shape), jnp.float32)
            other = operand(1 - i)

            def apply(c, other=other, i=i):
                pair = (c, other) if i == 0 else (other, c)
                return _bind(eqn.primitive, params, pair)

            reached = jax.vmap(apply, in_axes=-1, out_axes=-1)(colours)
            out = _union(out, np.asarray(reached) > 0)
        return [out]

    def _reduce(self, eqn, deps, values):
        # `lax.reduce` with a computation of its own (not a sum, max, …): each result
        # element may depend on every element of every operand along the reduced dimensions,
        # and on every initial value.
        count = len(eqn.outvars)
        dims = tuple(eqn.params["dimensions"])
        per_position = None
        for d, v in zip(deps[:count], eqn.invars[:count]):
            per_position = _union(per_position, _any(_full(d, v.aval.shape), dims))
        inits = _union_all(deps[count:], self.num_colours)
        return [
            _union(_full(per_position, o.aval.shape), _full(inits, o.aval.shape))
            for o in eqn.outvars
        ]

    def _sort(self, eqn, deps, values):
        # Every result along the sorted dimension may come from any position of any operand.
        dim = eqn.params["dimension"]
        everything = None
        for d, v in zip(deps, eqn.invars):
            if d is not None:
                everything = _union(everything, _any(_full(d, v.aval.shape), (dim,), keepdims=True))
        return [_full(everything, v.aval.shape) for v in eqn.outvars]

    # Control flow.

    def _cond(self, eqn, deps, values):
        branches = eqn.params["branches"]
        index, operands = values[0], deps[1:]
        operand_values = values[1:]
        if index is not None:
            chosen = [branches[int(np.clip(index, 0, len(branches) - 1))]]
        else:
            chosen = branches
        out = [None] * len(eqn.outvars)
        for branch in chosen:
            for i, d in enumerate(self.closed(branch, operands, operand_values)):
                out[i] = _union(out[i], d)
        if deps[0] is not None:  # the branch index itself carries colours (never in practice)
            out = [
                _union(o, _full(deps[0].any(axis=tuple(range(deps[0].ndim - 1))), v.aval.shape))
                for o, v in zip(out, eqn.outvars)
            ]
        return out

    def _scan(self, eqn, deps, values):
        p = eqn.params
        body, length = p["jaxpr"], p["length"]
        nc, ncarry = p["num_consts"], p["num_carry"]
        consts, carry, xs = deps[:nc], list(deps[nc : nc + ncarry]), deps[nc + ncarry :]
        const_values = values[:nc]
        x_avals = [v.aval for v in eqn.invars[nc + ncarry :]]
        y_avals = [v.aval for v in eqn.outvars[ncarry:]]
        if length <= _UNROLL:
            # Exactly, step by step.
            ys = [[None] * length for _ in y_avals]
            steps = range(length - 1, -1, -1) if p["reverse"] else range(length)
            for t in steps:
                x_t = [None if d is None else _full(d, a.shape)[t] for d, a in zip(xs, x_avals)]
                out = self.closed(
                    body, [*consts, *carry, *x_t], [*const_values] + [None] * (ncarry + len(xs))
                )
                carry, y_t = out[:ncarry], out[ncarry:]
                for i, y in enumerate(y_t):
                    ys[i][t] = y
            stacked = []
            for per_step, aval in zip(ys, y_avals):
                if all(y is None for y in per_step):
                    stacked.append(None)
                else:
                    stacked.append(
                        np.stack(
                            [
                                np.zeros((*aval.shape[1:], self.num_colours), bool)
                                if y is None
                                else _full(y, aval.shape[1:])
                                for y in per_step
                            ]
                        )
                    )
            return [*carry, *stacked]
        # Long loops: the least fixed point over the carry, each step seeing every step's `xs`.
        x_any = [None if d is None else _any(_full(d, a.shape), (0,)) for d, a in zip(xs, x_avals)]
        carry_avals = [v.aval for v in eqn.outvars[:ncarry]]
        while True:
            out = self.closed(
                body, [*consts, *carry, *x_any], [*const_values] + [None] * (ncarry + len(xs))
            )
            new_carry = [_union(c, o) for c, o in zip(carry, out[:ncarry])]
            if all(_same(a, b, av.shape) for a, b, av in zip(new_carry, carry, carry_avals)):
                break
            carry = new_carry
        out = self.closed(
            body, [*consts, *carry, *x_any], [*const_values] + [None] * (ncarry + len(xs))
        )
        ys = [
            None
            if y is None
            else np.broadcast_to(_full(y, a.shape[1:])[None], (*a.shape, self.num_colours))
            for y, a in zip(out[ncarry:], y_avals)
        ]
        return [*carry, *ys]

    def _while(self, eqn, deps, values):
        p = eqn.params
        body = p["body_jaxpr"]
        nb, nc = p["body_nconsts"], p["cond_nconsts"]
        consts = deps[nc : nc + nb]
        carry = list(deps[nc + nb :])
        carry_avals = [v.aval for v in eqn.outvars]
        if any(d is not None for d in deps[:nc]):
            self.unknown.add("while (a condition that depends on carried values)")
        while True:
            out = self.closed(
                body, [*consts, *carry], list(values[nc : nc + nb]) + [None] * len(carry)
            )
            new_carry = [_union(c, o) for c, o in zip(carry, out)]
            if all(_same(a, b, av.shape) for a, b, av in zip(new_carry, carry, carry_avals)):
                return carry
            carry = new_carry


#: Scans up to this length are walked step by step (exact); longer ones by a fixed point.
_UNROLL = 64


def _bind(primitive, params, operands):
    """Applies `primitive` as a jaxpr equation would (JAX up to 0.9 returns sub-functions
    with the parameters; later versions the parameters alone)."""
    bind_params = primitive.get_bind_params(params)
    subfuns = []
    if isinstance(bind_params, tuple):
        subfuns, bind_params = bind_params
    return primitive.bind(*subfuns, *operands, **bind_params)


def _sub_jaxpr(eqn):
    """The closed jaxpr of a call-like equation (`jit`, `custom_jvp_call`, `custom_vjp_call`,
    `remat`, …) and where its operands start, or `None`."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if isinstance(inner, jcore.Jaxpr):
            inner = jcore.ClosedJaxpr(inner, ())
        if isinstance(inner, jcore.ClosedJaxpr):
            offset = len(eqn.invars) - len(inner.jaxpr.invars)
            # A call runs its jaxpr once on its operands: the same number of results, of the
            # same ranks. `reduce` and `reduce_window` also hold a jaxpr, the scalar
            # computation they fold along an axis; walked as a call, `lax.reduce(t, 0, lambda
            # a, b: b, ...)` took the value of its initial value (a zero) and cut the
            # dependence that a product with it carries.
            calls = (
                offset >= 0
                and len(inner.jaxpr.outvars) == len(eqn.outvars)
                and all(_rank(v) == _rank(o) for v, o in zip(inner.jaxpr.outvars, eqn.outvars))
                and all(
                    _rank(v) == _rank(o) for v, o in zip(inner.jaxpr.invars, eqn.invars[offset:])
                )
            )
            return (inner, offset) if calls else None
    if "branches" in eqn.params or "body_jaxpr" in eqn.params:
        return eqn, 0
    return None


def _rank(var) -> int:
    return len(getattr(var.aval, "shape", ()))


def _is_array(leaf) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def _is_floating(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and hasattr(leaf, "shape") and jnp.issubdtype(dtype, jnp.inexact)


def _is_concrete(value) -> bool:
    try:
        np.asarray(value)
        return True
    except Exception:
        return False


def _full(d, shape):
    """`d` broadcast to `(*shape, C)` (a scalar's colours reach every element)."""
    if d is None:
        return None
    return np.broadcast_to(d, (*shape, d.shape[-1]))


def _union(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return np.logical_or(a, b)


def _union_all(deps, num_colours):
    """One colour set: every colour any element of any operand holds."""
    out = np.zeros(num_colours, bool)
    for d in deps:
        if d is not None:
            out |= d.reshape(-1, d.shape[-1]).any(axis=0)
    return out if out.any() else None


def _any(d, axes, keepdims=False):
    if d is None:
        return None
    return np.any(d, axis=tuple(axes), keepdims=keepdims)


def _cumulative(d, axis, reverse):
    if d is None:
        return None
    if reverse:
        return np.flip(np.logical_or.accumulate(np.flip(d, axis), axis=axis), axis)
    return np.logical_or.accumulate(d, axis=axis)


def _same(a, b, shape) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(_full(a, shape), _full(b, shape)))


def index_colours(index: np.ndarray, count: int) -> np.ndarray:
    """Colours `(*index.shape, 2 · bits)` that tell, of any set of indices in `[0, count)`,
    whether it holds none, one (and which) or several: each bit of the index in binary sets
    one of two colours. Two different indices differ in some bit, so a union of several has
    both colours of that bit (`decode_index`). A walk with `2 · log2(count)` colours then
    answers "which one element, if any" for every input at once."""
    bits = max(1, int(np.ceil(np.log2(max(count, 2)))))
    index = np.asarray(index)
    set_bits = (index[..., None] >> np.arange(bits)) & 1
    return np.concatenate([set_bits == 1, set_bits == 0], axis=-1) & (index >= 0)[..., None]


def decode_index(colours: np.ndarray) -> np.ndarray:
    """The index each colour set of `index_colours` holds: `-1` for none, `-2` for several."""
    bits = colours.shape[-1] // 2
    ones, zeros = colours[..., :bits], colours[..., bits:]
    several = np.any(ones & zeros, axis=-1)
    none = ~np.any(ones | zeros, axis=-1)
    value = np.sum(ones.astype(np.int64) << np.arange(bits), axis=-1)
    return np.where(several, -2, np.where(none, -1, value)).astype(np.int32)
