"""Synaptic ops: the sub-modules of a cell whose output is linear in their weights.

The diagonal rules recognise ops structurally, by type, among a cell's fields (not by
interpreting the cell's jaxpr). What a rule computes with an op is its *algebra*, an `OpAlgebra`
registered for the op's type with `register_op`: how to turn the op's raw input into the vector
`a` its weights multiply, how to apply the op to such a vector (also to an input trace), which
array is its bias, and, for D-RTRL, how to spread a per-output vector over the weights and back.
The base class derives all of these by automatic differentiation, so a new op is one
registration; the built-in ops override them with hand-written broadcasts that fuse into one
pass over a trace.
"""

import functools
import math
import string
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._memo import clear_structural_memos
from .nn._einsum import EinsumLinear, parse_equation
from .nn._feedback import RandomFeedback
from .nn._grouped import GroupedLinear
from .nn._linear import Linear
from .nn._lowrank import LowRankLinear


class OpAlgebra:
    """How the diagonal rules (`DRTRL`, `SnAp1`, `PPProp`) compute with one type of synaptic op.

    An op `u = op(a; W)` must be linear in its weights `W` for a fixed input vector `a` (dense,
    masked, sparse, convolution, embedding). Register an algebra for a type of your own with
    `eqtrace.register_op(MyOp, OpAlgebra())`; the defaults below are derived by automatic
    differentiation from `apply`, so only `input`, `apply` or `bias` may need overriding.
    Overriding the D-RTRL methods (`spread`, `outer`, `contract`, `outer_sum`) with broadcasts,
    or SnAp-1's `restricted` with a gather of the weights concerned, only makes them faster.

    Arrays called `v` or `cotangent` are shaped like the op's output, `u.shape`, followed by
    extra trailing axes (one per state leaf, or two); every method keeps those trailing axes.
    Weight-shaped results may be any arrays that broadcast against the weights.
    """

    def input(self, op: Any, raw_input: Any) -> jax.Array:
        """The vector `a` the weights multiply, from the op's call argument (identity by
        default; an embedding turns its integer index into a one-hot vector)."""
        del op
        return raw_input

    def apply(self, op: Any, a: jax.Array) -> jax.Array:
        """The op on an input vector `a` from `input` (by default, `op(a)`)."""
        return op(a)

    def bias(self, op: Any) -> Any:
        """The op's bias (an array added to the output, the weights of a constant input of 1),
        or `None`. pp-prop gives it the input trace of that constant. (Also used as the `where`
        of `eqx.tree_at`, so it must return the op's attribute itself.)"""
        return getattr(op, "bias", None)

    def spread(self, op: Any, a: jax.Array, v: jax.Array) -> Any:
        """`B(v)`: a per-output vector spread over the weights, `v[i]` on every weight of
        output `i` (for ops whose every weight reaches one output). `a` gives the input's
        shape and dtype only."""
        return self._vjp_over_extra(op, jnp.ones_like(a), v)

    def outer(self, op: Any, a: jax.Array, cotangent: jax.Array) -> Any:
        """`VJP_W[op(a; ·)](cotangent)`: for a dense op, the outer product `cotangent ⊗ a`."""
        return self._vjp_over_extra(op, a, cotangent)

    def contract(self, op: Any, a: jax.Array, trace: Any, delta: Any) -> jax.Array:
        """`Bᵀ(ε ⊙ δW)`: a weight-shaped trace times a weight tangent, summed onto the op's
        outputs (the transpose of `spread`). `a` gives the input's shape and dtype only."""
        params, static = eqx.partition(op, eqx.is_inexact_array)
        product = jtu.tree_map(lambda e, d: jnp.broadcast_to(e, d.shape) * d, trace, delta)
        return jax.jvp(
            lambda p: self.apply(eqx.combine(p, static), jnp.ones_like(a)), (params,), (product,)
        )[1]

    def outer_sum(self, op: Any, a: jax.Array, cotangent: jax.Array) -> Any:
        """`Σ_t outer(op, a_t, cotangent_t)` over a leading time axis."""
        per_step = jax.vmap(lambda a_t, c_t: self.outer(op, a_t, c_t))(a, cotangent)
        return jtu.tree_map(lambda w: jnp.sum(w, axis=0), per_step)

    def outer_reached(
        self, op: Any, a: jax.Array, cotangent: jax.Array, reach: tuple[Any, ...]
    ) -> tuple[jax.Array | None, ...]:
        """The immediate term of the arrays whose weights reach several outputs, laid out as
        their `reach` says: per array (in `jax.tree_util.tree_leaves` order of the op's
        floating arrays) with a `Reach` `r`, `(r.count, *W.shape, *extra)`, whose entry
        `[c, w]` is `cotangent[j] ∂u_j/∂W_w` for the output `j = r.index[c, w]` of colour
        `c` that `w` reaches (zero where none); `None` for the other arrays. By default one
        VJP of the op per colour (vectorised), as no weight reaches two outputs of one colour;
        the built-in ops with such arrays (`eqtrace.nn.LowRankLinear`, `eqx.nn.Conv*`) use
        a product of the cotangent with the input instead."""
        leaves = jtu.tree_leaves(op_params(op))
        out: list[jax.Array | None] = [None] * len(leaves)
        groups: dict[bytes, list[int]] = {}
        for i, r in enumerate(reach):
            if r is not None:
                groups.setdefault(r.colours.tobytes(), []).append(i)
        for members in groups.values():
            r = reach[members[0]]
            # One 0/1 mask of the outputs per colour, broadcast over the trailing axes.
            masks = r.colours[None] == np.arange(r.count).reshape(-1, *(1,) * r.colours.ndim)
            masks = masks.reshape(*masks.shape, *(1,) * (cotangent.ndim - r.colours.ndim))
            per_colour = jax.vmap(lambda m: jtu.tree_leaves(self.outer(op, a, cotangent * m)))(
                jnp.asarray(masks, cotangent.dtype)
            )
            for i in members:
                out[i] = per_colour[i]
        return tuple(out)

    def restricted(
        self,
        op: Any,
        a: jax.Array,
        tangent: jax.Array,
        input_owners: np.ndarray,
        output_owners: np.ndarray,
    ) -> jax.Array:
        """SnAp-1's self-paths through the op: its derivative along an input `tangent`, with
        each output element seeing only the input elements of its own neuron,
        `δu_j = Σ_{i: owner(i) = owner(j)} ∂u_j/∂a_i δa_i`. The owners are flat neuron indices
        over `a` and over the output (`-1`: no neuron). By default one JVP of the op per
        neuron (vectorised); the built-in ops gather the few weights concerned instead.
        """
        in_owners = jnp.asarray(input_owners.reshape(a.shape))
        neurons = np.unique(input_owners[input_owners >= 0])

        def own_paths(n):
            masked = jnp.where(in_owners == n, tangent, 0)
            du = jax.jvp(lambda a: self.apply(op, a), (a,), (masked,))[1]
            return jnp.where(jnp.asarray(output_owners.reshape(du.shape)) == n, du, 0)

        return jnp.sum(jax.vmap(own_paths)(jnp.asarray(neurons)), axis=0)

    def _vjp_over_extra(self, op: Any, a: jax.Array, cotangent: jax.Array) -> Any:
        """`VJP_W[op(a; ·)]` applied to each slice of `cotangent` along its extra trailing axes,
        which the weight-shaped result keeps, trailing."""
        params, static = eqx.partition(op, eqx.is_inexact_array)
        u, pullback = jax.vjp(lambda p: self.apply(eqx.combine(p, static), a), params)
        extra = cotangent.shape[u.ndim :]
        flat = cotangent.reshape(*u.shape, math.prod(extra)).astype(u.dtype)
        pulled = jax.vmap(lambda c: pullback(c)[0], in_axes=-1, out_axes=-1)(flat)
        return jtu.tree_map(lambda w: w.reshape(*w.shape[:-1], *extra), pulled)


@functools.singledispatch
def _algebra_of(op: Any) -> OpAlgebra | None:
    """The algebra registered for the type of `op` (or a base class of it), `None` if none."""
    del op
    return None


def register_op(op_type: type, algebra: OpAlgebra | None = None) -> None:
    """Makes the diagonal rules treat every instance of `op_type` (and of its subclasses) held
    by a cell as a synaptic op, traced per call as described by `algebra`.

    **Arguments:**

    - `op_type`: a callable `eqx.Module` class, `u = op(raw_input)`, linear in its floating
      arrays for a fixed input.
    - `algebra`: an `OpAlgebra` (or a subclass overriding some of its methods); the default
      `OpAlgebra()` derives everything from calling the op.

    **Returns:** nothing. Which outputs each weight of the op reaches is read from the
    op's code, not declared: an array whose weights each reach one output has a
    weight-shaped trace under D-RTRL, SnAp-1 and e-prop; one whose weights reach several (a
    low-rank `U @ V`, a convolution) has a trace per (output reached, weight).
    """
    algebra = OpAlgebra() if algebra is None else algebra
    if not isinstance(algebra, OpAlgebra):
        raise TypeError(
            "register_op: `algebra` must be an `eqtrace.OpAlgebra` (or a subclass), but "
            f"received a {type(algebra).__name__}."
        )
    _algebra_of.register(op_type)(lambda op: algebra)
    clear_structural_memos()  # Which fields are ops is part of what the analyses read.


def algebra(op: Any) -> OpAlgebra:
    found = _algebra_of(op)
    assert found is not None, f"{type(op).__name__} is not a registered synaptic op"
    return found


def is_op(node: Any) -> bool:
    return _algebra_of(node) is not None


def op_params(op: Any) -> Any:
    return eqx.filter(op, eqx.is_inexact_array)


# The built-in ops. Their D-RTRL methods are broadcasts and element-wise products, not VJPs, so
# that the whole trace update fuses into one pass over the trace.


def _with_weight_and_bias(params: Any, weight: jax.Array, bias: jax.Array) -> Any:
    params = eqx.tree_at(lambda p: p.weight, params, weight)
    if getattr(params, "bias", None) is not None:
        params = eqx.tree_at(lambda p: p.bias, params, bias)
    return params


def _masked(op: Any, weight: jax.Array) -> jax.Array:
    mask = getattr(op, "mask", None)
    if mask is None:
        return weight
    return jnp.where(mask.reshape(*mask.shape, *(1,) * (weight.ndim - 2)), weight, 0)


def same_owner_index(
    input_owners: np.ndarray, output_owners: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each output element `j`, the input elements of its own neuron, `(O, P)` indices
    padded to the most any neuron has, and which of them are real."""
    per_neuron: dict[int, list[int]] = {}
    for i, n in enumerate(input_owners.tolist()):
        if n >= 0:
            per_neuron.setdefault(n, []).append(i)
    width = max((len(v) for v in per_neuron.values()), default=0)
    index = np.zeros((output_owners.size, width), np.int32)
    valid = np.zeros((output_owners.size, width), bool)
    for j, n in enumerate(output_owners.tolist()):
        inputs = per_neuron.get(n, [])
        index[j, : len(inputs)] = inputs
        valid[j, : len(inputs)] = True
    return index, valid


class _DenseAlgebra(OpAlgebra):
    """`eqtrace.nn.Linear` (optionally masked) and `eqx.nn.Linear`: `u = W a + b`."""

    def spread(self, op, a, v):
        del a
        return _with_weight_and_bias(op_params(op), v[:, None], v)

    def outer(self, op, a, cotangent):
        extra = (1,) * (cotangent.ndim - 1)
        weight = _masked(op, cotangent[:, None] * a.reshape(1, -1, *extra))
        return _with_weight_and_bias(op_params(op), weight, cotangent)

    def contract(self, op, a, trace, delta):
        # einsum, not sum(ε * δW): under `jax.vmap` its transpose (the gradient, summed over
        # the batch) becomes one dot; a multiply-then-reduce over the major batch axis is an
        # order of magnitude slower on CPU.
        del a
        out = jnp.einsum("oi,oi->o", trace.weight, delta.weight)
        if getattr(op, "bias", None) is not None:
            out = out + trace.bias * delta.bias
        return out

    def restricted(self, op, a, tangent, input_owners, output_owners):
        # Only the weights `W[j, i]` with `i` and `j` of one neuron act: gathered, `(O, P)`
        # for at most `P` inputs per neuron, instead of a masked copy of `W`.
        index, valid = same_owner_index(input_owners, output_owners)
        rows = np.arange(index.shape[0])[:, None]
        weight = op.weight[rows, index]
        mask = getattr(op, "mask", None)
        if mask is not None:
            valid = valid & mask[rows, index]
        return jnp.sum(jnp.where(valid, weight, 0) * tangent[index], axis=-1)

    def outer_sum(self, op, a, cotangent):
        # One contraction over the time axis (a matrix product), not `t` rank-one updates.
        weight = _masked(op, jnp.einsum("to...,ti->oi...", cotangent, a))
        return _with_weight_and_bias(op_params(op), weight, jnp.sum(cotangent, axis=0))


class _EmbeddingAlgebra(OpAlgebra):
    """`eqx.nn.Embedding`: `u = W[index]`, the one-hot vector of the index times `W`."""

    def input(self, op, raw_input):
        return jax.nn.one_hot(raw_input, op.num_embeddings, dtype=op.weight.dtype)

    def apply(self, op, a):
        return a @ op.weight

    def bias(self, op):
        return None

    def spread(self, op, a, v):
        del a
        return eqx.tree_at(lambda p: p.weight, op_params(op), v[None])

    def outer(self, op, a, cotangent):
        weight = a.reshape(-1, 1, *(1,) * (cotangent.ndim - 1)) * cotangent[None]
        return eqx.tree_at(lambda p: p.weight, op_params(op), weight)

    def contract(self, op, a, trace, delta):
        del op, a
        return jnp.einsum("vo,vo->o", trace.weight, delta.weight)

    def outer_sum(self, op, a, cotangent):
        weight = jnp.einsum("tv,to...->vo...", a, cotangent)
        return eqx.tree_at(lambda p: p.weight, op_params(op), weight)


class _FeedbackAlgebra(OpAlgebra):
    """`eqtrace.nn.RandomFeedback`: the wrapped op's algebra, on its `op` field. (Its fixed
    feedback matrix only changes the derivative with respect to the input, which the rules
    take from the cell itself.)"""

    def __init__(self, inner: OpAlgebra):
        self.inner = inner

    def _wrap(self, op, inner_params):
        return eqx.tree_at(lambda p: p.op, op_params(op), inner_params)

    def bias(self, op):
        return self.inner.bias(op.op)

    def spread(self, op, a, v):
        return self._wrap(op, self.inner.spread(op.op, a, v))

    def outer(self, op, a, cotangent):
        return self._wrap(op, self.inner.outer(op.op, a, cotangent))

    def contract(self, op, a, trace, delta):
        return self.inner.contract(op.op, a, trace.op, delta.op)

    def outer_sum(self, op, a, cotangent):
        return self._wrap(op, self.inner.outer_sum(op.op, a, cotangent))


def _trailing(x: jax.Array, extra: int) -> jax.Array:
    """`x` with `extra` unit axes appended (to broadcast against a cotangent's extra axes)."""
    return x.reshape(*x.shape, *(1,) * extra)


def _only_reached(op: Any, reach: tuple[Any, ...], values: dict[str, jax.Array]) -> tuple:
    """`outer_reached`'s result from the arrays computed for the fields named in `values`:
    placed by the field's leaf position, `None` for the arrays without a `Reach`."""
    params = op_params(op)
    placed = eqx.tree_at(
        lambda p: [getattr(p, name) for name in values], params, list(values.values())
    )
    return tuple(
        None if r is None else leaf for leaf, r in zip(jtu.tree_leaves(placed), reach, strict=True)
    )


class _GroupedAlgebra(OpAlgebra):
    """`eqtrace.nn.GroupedLinear`: block-diagonal, `u_g = W_g a_g + b_g`; each weight reaches
    one output, so its trace is weight-shaped, `(G, O/G, I/G, K)`."""

    def spread(self, op, a, v):
        del a
        weight = v.reshape(op.groups, -1, 1, *v.shape[1:])
        return _with_weight_and_bias(op_params(op), weight, v)

    def outer(self, op, a, cotangent):
        extra = cotangent.ndim - 1
        blocks = _trailing(a.reshape(op.groups, 1, -1), extra)
        weight = cotangent.reshape(op.groups, -1, 1, *cotangent.shape[1:]) * blocks
        return _with_weight_and_bias(op_params(op), weight, cotangent)

    def contract(self, op, a, trace, delta):
        del a
        out = jnp.einsum("goi,goi->go", trace.weight, delta.weight).reshape(op.out_features)
        if op.bias is not None:
            out = out + trace.bias * delta.bias
        return out

    def outer_sum(self, op, a, cotangent):
        steps = cotangent.shape[0]
        per_group = cotangent.reshape(steps, op.groups, -1, *cotangent.shape[2:])
        weight = jnp.einsum("tgo...,tgi->goi...", per_group, a.reshape(steps, op.groups, -1))
        return _with_weight_and_bias(op_params(op), weight, jnp.sum(cotangent, axis=0))


class _LowRankAlgebra(OpAlgebra):
    """`eqtrace.nn.LowRankLinear`: `u = [W a +] U (V a) + b`. `W`, `U` and `b` have
    weight-shaped traces (each weight reaches one output); `V`'s weights reach every output,
    so its trace, one value per (output, weight), is `(O, R, I, K)`, the output as colour.
    The methods for the weight-shaped arrays leave `V`'s entry a placeholder (a scalar)."""

    def _fill(self, op, weight, u, bias, placeholder):
        params = op_params(op)
        names = ["u", "v"] + (["weight"] if op.weight is not None else [])
        names += ["bias"] if op.bias is not None else []
        values = {"u": u, "v": placeholder, "weight": weight, "bias": bias}
        return eqx.tree_at(
            lambda p: [getattr(p, n) for n in names], params, [values[n] for n in names]
        )

    def spread(self, op, a, v):
        del a
        return self._fill(op, v[:, None], v[:, None], v, jnp.zeros((), v.dtype))

    def outer(self, op, a, cotangent):
        extra = cotangent.ndim - 1
        projected = op.v @ a
        return self._fill(
            op,
            cotangent[:, None] * _trailing(a[None], extra),
            cotangent[:, None] * _trailing(projected[None], extra),
            cotangent,
            jnp.zeros((), cotangent.dtype),
        )

    def contract(self, op, a, trace, delta):
        del a
        out = jnp.einsum("or,or->o", trace.u, delta.u)
        if op.weight is not None:
            out = out + jnp.einsum("oi,oi->o", trace.weight, delta.weight)
        if op.bias is not None:
            out = out + trace.bias * delta.bias
        return out

    def outer_sum(self, op, a, cotangent):
        projected = a @ op.v.T  # (T, R)
        return self._fill(
            op,
            jnp.einsum("to...,ti->oi...", cotangent, a),
            jnp.einsum("to...,tr->or...", cotangent, projected),
            jnp.sum(cotangent, axis=0),
            jnp.zeros((), cotangent.dtype),
        )

    def outer_reached(self, op, a, cotangent, reach):
        index = [r for r in reach if r is not None]
        # The layout this product assumes: `V`'s only, its colour the output index.
        if len(index) != 1 or not np.array_equal(index[0].colours, np.arange(op.out_features)):
            return super().outer_reached(op, a, cotangent, reach)
        extra = cotangent.ndim - 1
        # `[j, r, i] = c[j] U[j, r] a[i]`.
        per_output = cotangent.reshape(op.out_features, 1, 1, *cotangent.shape[1:])
        v = per_output * _trailing(op.u[:, :, None] * a[None, None, :], extra)
        return _only_reached(op, reach, {"v": v})


class _ConvAlgebra(OpAlgebra):
    """`eqx.nn.Conv*`: each kernel weight reaches every output position of its channel; its
    trace holds one value per (output position, weight), `(P, C_out, C_in, *kernel, K)`,
    the position as colour. The immediate term is the cotangent times the input's patches
    (one `conv_general_dilated_patches`), where the derived algebra takes a VJP per
    position. Other convolutions (grouped, non-zero padding modes) take the derived one."""

    def outer_reached(self, op, a, cotangent, reach):
        spatial = cotangent.shape[1 : op.num_spatial_dims + 1]
        positions = math.prod(spatial)
        expected = np.broadcast_to(
            np.arange(positions).reshape(spatial), (op.out_channels, *spatial)
        )
        fused = (
            op.groups == 1
            and op.padding_mode == "ZEROS"
            and all(r is None or np.array_equal(r.colours, expected) for r in reach)
        )
        if not fused:
            return super().outer_reached(op, a, cotangent, reach)
        kernel = op.weight.shape[2:]
        patches = jax.lax.conv_general_dilated_patches(
            a[None],
            filter_shape=kernel,
            window_strides=op.stride,
            padding=op.padding,
            rhs_dilation=op.dilation,
        )[0]  # (C_in · prod(kernel), *spatial), channel-major
        patches = jnp.moveaxis(patches.reshape(op.in_channels, *kernel, positions), -1, 0)
        extra = cotangent.ndim - 1 - op.num_spatial_dims
        # `(P, C_out, *extra)`: the cotangent per position.
        per_position = jnp.moveaxis(
            cotangent.reshape(op.out_channels, positions, *cotangent.shape[1 + len(spatial) :]),
            1,
            0,
        )
        ones = (1,) * (1 + len(kernel))
        weight = per_position.reshape(positions, op.out_channels, *ones, *per_position.shape[2:])
        weight = weight * _trailing(patches[:, None], extra)
        values = {"weight": weight.astype(cotangent.dtype)}
        if op.bias is not None:
            values["bias"] = per_position.reshape(
                positions, op.out_channels, *(1,) * op.num_spatial_dims, *per_position.shape[2:]
            )
        return _only_reached(op, reach, values)


class _EinsumAlgebra(OpAlgebra):
    """`eqtrace.nn.EinsumLinear`: `u = einsum("a,w->u", a, W) + b`. Where every output letter
    of size above 1 is a letter of `W` (`fused`), each weight reaches one output and the
    weight-trace methods are einsums of the equation's subscripts (`W`'s letters missing
    from the output become unit axes, which broadcast). Otherwise `W`'s weights reach
    several outputs: its trace takes the structural layout, through the derived
    `outer_reached` (a VJP per colour, here one einsum), and these methods leave its entry
    a placeholder (a scalar), except `outer`, which is the VJP itself."""

    def _parts(self, op):
        a_subs, w_subs, u_subs = parse_equation(op.equation)
        sizes = dict(zip(u_subs, op.output_shape))
        fused = all(sizes[c] == 1 for c in u_subs if c not in w_subs)
        return a_subs, w_subs, u_subs, fused

    @staticmethod
    def _as_weight(w_subs, present, x):
        """`x`, laid out over `present` (in `w_subs` order) then trailing axes, with a unit
        axis for each of `W`'s letters not in `present`."""
        shape = [x.shape[present.index(c)] if c in present else 1 for c in w_subs]
        return x.reshape(*shape, *x.shape[len(present) :])

    def spread(self, op, a, v):
        del a
        _, w_subs, u_subs, fused = self._parts(op)
        if not fused:
            return _with_weight_and_bias(op_params(op), jnp.zeros((), v.dtype), v)
        present = "".join(c for c in w_subs if c in u_subs)
        # Sums over the output's unit axes that `W` lacks, and orders the rest as in `W`.
        core = jnp.einsum(f"{u_subs}...->{present}...", v)
        weight = self._as_weight(w_subs, present, core)
        return _with_weight_and_bias(op_params(op), weight, v)

    def outer(self, op, a, cotangent):
        a_subs, w_subs, u_subs, _ = self._parts(op)
        present = "".join(c for c in w_subs if c in a_subs + u_subs)
        core = jnp.einsum(f"{a_subs},{u_subs}...->{present}...", a, cotangent)
        # Full-shaped: the derived `outer_reached` stacks these per colour.
        extra = cotangent.shape[len(u_subs) :]
        weight = jnp.broadcast_to(
            self._as_weight(w_subs, present, core), (*op.weight.shape, *extra)
        )
        return _with_weight_and_bias(op_params(op), weight, cotangent)

    def contract(self, op, a, trace, delta):
        del a
        _, w_subs, u_subs, fused = self._parts(op)
        out = jnp.zeros(op.output_shape, delta.weight.dtype)
        if fused:
            present = "".join(c for c in u_subs if c in w_subs)
            eps = jnp.broadcast_to(trace.weight, delta.weight.shape)
            core = jnp.einsum(f"{w_subs},{w_subs}->{present}", eps, delta.weight)
            out = core.reshape(op.output_shape)  # `present` is `u_subs` less unit axes
        if op.bias is not None:
            out = out + trace.bias * delta.bias
        return out

    def outer_sum(self, op, a, cotangent):
        a_subs, w_subs, u_subs, fused = self._parts(op)
        if not fused:
            weight = jnp.zeros((), cotangent.dtype)
        else:
            time = next(c for c in string.ascii_letters if c not in a_subs + w_subs + u_subs)
            present = "".join(c for c in w_subs if c in a_subs + u_subs)
            core = jnp.einsum(f"{time}{a_subs},{time}{u_subs}...->{present}...", a, cotangent)
            weight = self._as_weight(w_subs, present, core)
        return _with_weight_and_bias(op_params(op), weight, jnp.sum(cotangent, axis=0))


register_op(Linear, _DenseAlgebra())
_DENSE, _DERIVED = _DenseAlgebra(), OpAlgebra()


@_algebra_of.register(eqx.nn.Linear)
def _eqx_linear_algebra(op: eqx.nn.Linear) -> OpAlgebra:
    # `eqx.nn.Linear("scalar", ...)` takes or gives a 0-d array, which the broadcasts of the
    # dense algebra do not index; the derived algebra takes any shapes.
    return _DERIVED if "scalar" in (op.in_features, op.out_features) else _DENSE


register_op(eqx.nn.Embedding, _EmbeddingAlgebra())
register_op(RandomFeedback, _FeedbackAlgebra(_DenseAlgebra()))
# A convolution shares each weight across positions: the weight-trace rules keep a trace per
# (output position, weight); pp-prop differentiates it with the derived algebra.
register_op(eqx.nn.Conv, _ConvAlgebra())
register_op(GroupedLinear, _GroupedAlgebra())
register_op(LowRankLinear, _LowRankAlgebra())
register_op(EinsumLinear, _EinsumAlgebra())
