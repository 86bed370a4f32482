"""The diagonal family (`DRTRL`, `SnAp1`, `PPProp`): what its rules share, so that a rule
states only its traces and how they move.

Every diagonal rule linearises a cell once per step, from the cell's structure, which
`eqtrace.prepare` analyses once and holds in the copy of the rule that runs the cell
(`prepared_structure`). From a single VJP of the cell (with every op's input cut and a zero
probe added to every op's output), pulled back along one cotangent per state leaf, come at
once:

- `D[k, m] = ∂h^k_t/∂h^m_{t-1}` with op outputs held fixed (element-wise, flat over neurons);
- `df[k, o] = ∂h^k_t/∂u_o`, shaped like the op's output;
- `∂h^k_t/∂p` for per-neuron parameters `p`;
- and, as auxiliary output, each op's input `a_t`.
Small shared parameters get their dense `∂h_t/∂p` from forward-mode JVPs.

Traces then move by `ε_t = D_t ε_{t-1} + I_t`, a K-by-K block per neuron; over a block of `C`
steps that unrolls to `ε_C = Φ(C, 0) ε_0 + Σ_τ Φ(C, τ) I_τ` with `Φ(C, τ) = D_C ⋯ D_{τ+1}`
(`transition_products`). The parameters outside ops have exact element-wise (or small dense)
traces, the same for every rule (`init_param_traces`, `step_param_traces`,
`block_param_traces`, `param_tangents`).
"""

import copy
import math
from typing import Any, ClassVar, NamedTuple, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox import AbstractVar

from .._algorithm import AbstractAlgorithm
from .._probing import other_params_spec, probed_call
from .._structure import CellStructure, StructureError, analyse
from .._validation import require_example_input


_Trace = TypeVar("_Trace")


class Linearisation(NamedTuple):
    new_state: Any
    #: `(K, K, N)`: `D[k, m, n] = ∂h^k_n/∂h^m_n` at the previous state, op outputs held fixed
    #: (or, for SnAp-1, the ops restricted to each neuron's own inputs).
    jacobian: jax.Array
    #: Per op, its input vector `a_t`.
    op_inputs: tuple[jax.Array, ...]
    #: Per op, `(K, *u_shape)`: `∂h^k/∂u` per output element.
    op_sensitivities: tuple[jax.Array, ...]
    #: Per non-op parameter, `(K, *neuron_shape)` (per-neuron) or `(K, N, |p|)` (shared).
    param_sensitivities: tuple[jax.Array | None, ...]


class AbstractDiagonalAlgorithm(AbstractAlgorithm[_Trace]):
    """A rule of the diagonal family: one trace per cell of a network, built from the cell's
    structure (`eqtrace.check` shows it) and its per-step linearisation."""

    per_layer: ClassVar[bool] = True
    #: Raise if the cell breaks the diagonal assumptions; else run as an approximation.
    strict: AbstractVar[bool]
    #: The structure of the cell this copy of the rule runs, set by `eqtrace.prepare`
    #: (`with_structure`) once the rule's refusals have passed; `None` for a rule not prepared
    #: for a cell, which analyses the cell on every call.
    prepared_structure: CellStructure | None = eqx.field(
        default=None, static=True, repr=False, kw_only=True
    )

    def with_structure(self, structure: CellStructure) -> "AbstractDiagonalAlgorithm":
        # A copy with the field set: `dataclasses.replace` would call the rule's own
        # `__init__` (`PPProp`'s takes `rank` or `decay`), which does not take the field.
        prepared = copy.copy(self)
        object.__setattr__(prepared, "prepared_structure", structure)
        return prepared

    def prepared(self) -> CellStructure:
        """The structure of the cell this rule was prepared for: what the per-step methods
        read (they never analyse a cell)."""
        if self.prepared_structure is None:
            name = type(self).__name__
            raise TypeError(
                f"{name}: the per-step methods (`cell_step`, `cell_tangent`, `cell_steps`) run "
                "on the rule prepared for a cell, which holds its structure: "
                f"`eqtrace.prepare({name}(), model, x).layers[i].rule`. Call `{name}().step` or "
                "`.steps` instead, which prepare it."
            )
        return self.prepared_structure

    def required_structure(self, cell, state, x) -> CellStructure:
        """The cell's structure (the prepared one, or analysed now), raising the rule's
        refusal if it cannot trace the cell: what `init_cell_trace` starts with."""
        structure = self.prepared_structure
        if structure is None:
            structure = self.cell_structure(cell, state, x)
        name = type(self).__name__
        untraceable = [p.path for p in structure.params if p.kind == "unsupported"]
        if untraceable:
            raise StructureError(
                f"{name} cannot trace the parameter(s) {untraceable} of "
                f"{structure.cell_name}: they are neither per-neuron, nor small and shared, nor "
                "inside a recognised synaptic op, so they would get no gradient. "
                f"{_equinox_layers_hint(cell)}Use `eqtrace.RTRL()` for this cell, or hold "
                "them in an op such as `eqtrace.nn.Linear`."
            )
        if self.strict and structure.violations:
            problems = "\n".join(f"  - {v}" for v in structure.violations)
            raise StructureError(
                f"{name} cannot trace {structure.cell_name}: its structure breaks the "
                f"diagonal assumptions:\n{problems}\n{_equinox_layers_hint(cell)}Use "
                "`eqtrace.RTRL()` for this cell, change the cell, or pass `strict=False` to "
                f"{name} to accept the approximation."
            )
        self.refuse(cell, structure, state)
        return structure

    def refuse(self, cell, structure: CellStructure, state) -> None:
        """Raises if this rule, in particular, cannot trace a cell of this structure."""
        del cell, structure, state

    def relaxed(self) -> "AbstractDiagonalAlgorithm":
        return self if not self.strict else eqx.tree_at(lambda a: a.strict, self, False)

    def cell_structure(self, cell, state, x) -> CellStructure:
        require_example_input(cell, x)
        return analyse(cell, state, x)

    def trace_neuron_axes(self, structure: CellStructure, site_axes, trace) -> Any:
        """By field: weight-shaped traces `ops` (`(*W.shape, K)`) split like their weights;
        `outputs` (`(K, *u_shape)`) and `params` (`(K, *neuron_shape)` or `(K, N, |p|)`)
        along axis 1; pp-prop's input traces and normaliser have no neuron axis."""
        del structure

        def axis(path, leaf):
            del leaf
            field = path[0].name
            if field == "ops":
                return axis_at(site_axes[path[1].idx], path[2:])
            if field in ("outputs", "params"):
                return 1
            return None

        return jtu.tree_map_with_path(axis, trace)


#: Equinox recurrent cells, whose matmuls are raw array products rather than synaptic ops, and
#: the eqtrace cells to hold instead.
_EQUINOX_REPLACEMENTS = {
    eqx.nn.GRUCell: "`eqtrace.nn.GRUCell`",
    eqx.nn.LSTMCell: "`eqtrace.nn.LSTMCell`",
}


def _equinox_layers_hint(cell) -> str:
    """A sentence per Equinox recurrent cell that `cell` holds (the structure analysis sees its
    matmuls as mixing or as untraceable parameters), naming its eqtrace replacement; or `""`."""
    kinds = tuple(_EQUINOX_REPLACEMENTS)
    found = [
        f"`{jtu.keystr(path) or '(the cell)'}` is an `eqx.nn.{type(layer).__name__}`, whose "
        f"matmuls are not synaptic ops: hold {_EQUINOX_REPLACEMENTS[type(layer)]} instead"
        for path, layer in jtu.tree_leaves_with_path(cell, is_leaf=lambda x: isinstance(x, kinds))
        if isinstance(layer, kinds)
    ]
    return "".join(f"{line}. " for line in found)


def axis_at(axes: Any, path: tuple) -> int | None:
    """The axis at `path` in a pytree of axes (`int` or `None` leaves)."""
    leaves = jtu.tree_leaves_with_path(axes, is_leaf=lambda a: a is None or isinstance(a, int))
    return dict(leaves)[path]


def flat_leaves(tree) -> jax.Array:
    """Stacks same-shaped state leaves into `(K, N)`."""
    return jnp.stack([jnp.ravel(leaf) for leaf in jtu.tree_leaves(tree)])


def unflatten_like(state, rows) -> Any:
    """Per-leaf rows `(N,)` (a `(K, N)` array or a sequence of K rows) back into the state's
    leaves."""
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(
        treedef, [row.reshape(leaf.shape).astype(leaf.dtype) for row, leaf in zip(rows, leaves)]
    )


def op_dtype(op) -> Any:
    """The dtype an op computes in: that of its floating parameters."""
    return jnp.result_type(*jtu.tree_leaves(eqx.filter(op, eqx.is_inexact_array)))


def state_dtype(state) -> Any:
    return jnp.result_type(*jtu.tree_leaves(state))


# Neurons and op outputs. Each output element of a call reaches one neuron (its owner).


def _tiles(structure: CellStructure, site: int) -> int | None:
    """How many times the outputs of call site `site` tile the neurons (`u = [u_1, …, u_r]`,
    each `u_j` one element per neuron, as for stacked gates), or `None` for another owner
    map."""
    owner, n = structure.sites[site].owners, structure.num_neurons
    if owner.size % n == 0 and np.array_equal(owner, np.tile(np.arange(n), owner.size // n)):
        return owner.size // n
    return None


def to_outputs(structure: CellStructure, flat: jax.Array, site: int) -> jax.Array:
    """Moves a per-neuron array `(..., N)` onto the output elements of call site `site`."""
    shape = structure.sites[site].output_shape
    tiles = _tiles(structure, site)
    if tiles is not None:  # A tile fuses into the trace update where a gather would not.
        moved = jnp.tile(flat, (1,) * (flat.ndim - 1) + (tiles,))
    else:
        moved = flat[..., structure.sites[site].owners]
    return moved.reshape(*flat.shape[:-1], *shape)


def from_outputs(structure: CellStructure, per_output: jax.Array, site: int) -> jax.Array:
    """Sums `(..., *u_shape)` over the output elements each neuron owns, giving `(..., N)`:
    the transpose of `to_outputs`."""
    output_shape = structure.sites[site].output_shape
    lead = per_output.shape[: per_output.ndim - len(output_shape)]
    flat = per_output.reshape(*lead, -1)
    n = structure.num_neurons
    tiles = _tiles(structure, site)
    if tiles is not None:
        return jnp.sum(flat.reshape(*lead, tiles, n), axis=-2)
    zeros = jnp.zeros((*lead, n), per_output.dtype)
    return zeros.at[..., structure.sites[site].owners].add(flat)


# The K-by-K mixing of state leaves, `Σ_m D[k, m] ⊙ ε[m]`.


def mix(jacobian: jax.Array, trace: jax.Array, *, leaf_axis: int = 0) -> jax.Array:
    """`Σ_m D[k, m] ⊙ ε[m]` for every leaf `k`, written as element-wise products so that XLA
    fuses it with the rest of a trace update (a `dot_general` over the tiny K axis would not
    fuse, and is many times slower on CPU when batched over neurons).

    With `leaf_axis=0` the leaf axes lead: `jacobian` is `(K, K, ...)` and `trace` `(K, ...)`.
    With `leaf_axis=-1` they trail (a weight-shaped trace `(*W.shape, K)`, the leaf axis last so
    the mixing stays within each weight's few values): `jacobian` is `(..., K, K)`.
    """
    if leaf_axis == 0:
        mixed = jacobian[:, 0] * trace[0][None]
        for m in range(1, trace.shape[0]):
            mixed = mixed + jacobian[:, m] * trace[m][None]
        return mixed
    mixed = jacobian[..., 0] * trace[..., 0:1]
    for m in range(1, trace.shape[-1]):
        mixed = mixed + jacobian[..., m] * trace[..., m : m + 1]
    return mixed


def transition_products(jacobians: jax.Array) -> tuple[jax.Array, jax.Array]:
    """From a block's `D_1 … D_C` `(C, K, K, N)`: `Φ(C, τ) = D_C ⋯ D_{τ+1}` for `τ = 1 … C`
    stacked (`Φ(C, C) = I`), and `Φ(C, 0)`. Then `ε_C = Φ(C, 0) ε_0 + Σ_τ Φ(C, τ) I_τ`."""
    k, n = jacobians.shape[1], jacobians.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(k, dtype=jacobians.dtype)[..., None], (k, k, n))

    def body(product, jacobian):
        # `product @ jacobian` over the leaf axes, per neuron.
        return mix(product[:, :, None], jacobian), product

    first, products = jax.lax.scan(body, eye, jacobians, reverse=True)
    return products, first


def linearise(
    cell, structure: CellStructure, state, x, op_outputs=None, restricted=None
) -> Linearisation:
    """The step's linearisation; with `op_outputs` (each op's output at this step, recorded
    earlier), the ops are not recomputed. With `restricted` (per call site, `None` or a map
    of an input tangent to the op's restricted output tangent), the op inputs are cut except
    for those maps' paths, which `D` then includes (SnAp-1)."""
    num_leaves, num_neurons = structure.num_leaves, structure.num_neurons
    params, rest = eqx.partition(cell, other_params_spec(cell, structure.op_called))

    def transition(state, probes, params):
        new_state, records = probed_call(
            eqx.combine(params, rest),
            state,
            x,
            probes,
            cut=True,
            outputs=op_outputs,
            sites=structure.site_ops,
            restricted=restricted,
        )
        return new_state, tuple(a for a, _ in records)

    probes = [
        jnp.zeros(site.output_shape, op_dtype(op))
        for site, op in zip(structure.sites, structure.site_modules(cell))
    ]
    new_state, pullback, op_inputs = jax.vjp(transition, state, probes, params, has_aux=True)
    leaves, treedef = jtu.tree_flatten(new_state)
    one_hot = jtu.tree_unflatten(
        treedef,
        [
            jnp.broadcast_to(
                (jnp.arange(num_leaves) == k).astype(leaf.dtype).reshape(-1, *[1] * leaf.ndim),
                (num_leaves, *leaf.shape),
            )
            for k, leaf in enumerate(leaves)
        ],
    )
    d_state, d_probes, d_params = jax.vmap(pullback)(one_hot)
    jacobian = jnp.stack(
        [leaf.reshape(num_leaves, num_neurons) for leaf in jtu.tree_leaves(d_state)], axis=1
    )

    param_sensitivities = []
    for i, (param, d_leaf) in enumerate(zip(structure.params, jtu.tree_leaves(d_params))):
        if param.kind == "shared":
            param_sensitivities.append(_shared_sensitivity(transition, state, probes, params, i))
        elif param.kind == "readout":  # Does not reach the state: no trace.
            param_sensitivities.append(None)
        else:
            param_sensitivities.append(d_leaf)
    return Linearisation(
        new_state=new_state,
        jacobian=jacobian,
        op_inputs=op_inputs,
        op_sensitivities=tuple(d_probes),
        param_sensitivities=tuple(param_sensitivities),
    )


def linearise_block(
    cell, structure: CellStructure, state, xs, restricted=None
) -> tuple[Linearisation, Any]:
    """The block's per-step linearisations stacked on a leading axis, and the states
    `h_0 … h_{C-1}` they start from. Only the plain cell runs step by step, recording its ops'
    outputs; the linearisations, which need just `(h_{t-1}, x_t)` and those outputs, are
    computed for all steps at once, without recomputing the ops (a scan of them would cost
    many small kernels per step)."""

    def body(state, x):
        new_state, records = probed_call(cell, state, x, cut=False, sites=structure.site_ops)
        return new_state, (state, tuple(u for _, u in records))

    _, (previous, op_outputs) = jax.lax.scan(body, state, xs)
    lins = jax.vmap(lambda h, x, u: linearise(cell, structure, h, x, u, restricted))(
        previous, xs, op_outputs
    )
    return lins, previous


def _shared_sensitivity(transition, state, probes, params, index: int) -> jax.Array:
    """`(K, N, |p|)`: the dense `∂h/∂p` of the `index`-th parameter, one JVP per entry of p."""
    leaves, treedef = jtu.tree_flatten(params)
    leaf = leaves[index]

    def jvp_along(direction):
        tangents = [jnp.zeros_like(p) for p in leaves]
        tangents[index] = direction.reshape(leaf.shape)
        _, out = jax.jvp(
            lambda p: transition(state, probes, p)[0],
            (params,),
            (jtu.tree_unflatten(treedef, tangents),),
        )
        return flat_leaves(out)

    try:
        columns = jax.vmap(jvp_along)(jnp.eye(leaf.size, dtype=leaf.dtype))  # (|p|, K, N)
    except TypeError as error:
        if "custom_vjp" not in str(error):
            raise

        # A `jax.custom_vjp` function on the parameter's path (a spike with a shared
        # threshold) has no forward mode: one VJP per state element instead.
        def with_leaf(p):
            return jtu.tree_unflatten(treedef, [*leaves[:index], p, *leaves[index + 1 :]])

        out, pullback = jax.vjp(
            lambda p: flat_leaves(transition(state, probes, with_leaf(p))[0]), leaf
        )
        basis = jnp.eye(out.size, dtype=out.dtype).reshape(out.size, *out.shape)
        rows = jax.vmap(lambda ct: pullback(ct)[0])(basis)  # (K·N, *p.shape)
        return rows.reshape(*out.shape, leaf.size).astype(out.dtype)
    return jnp.moveaxis(columns, 0, -1)


# The parameters outside ops: exact element-wise traces `ε_p[k] = Σ_m D[k, m] ⊙ ε_p[m] +
# ∂h^k/∂p` (`(K, *neuron_shape)`), or dense ones `(K, N, |p|)` for small shared parameters;
# none for read-out parameters, whose gradient is exact through `output`.


def init_param_traces(structure: CellStructure, cell) -> tuple[jax.Array | None, ...]:
    """Zero traces for the non-op parameters of `cell`."""
    k, n = structure.num_leaves, structure.num_neurons
    traces = []
    for param, leaf in zip(structure.params, structure.other_params(cell)):
        if param.kind == "readout":
            traces.append(None)
        elif param.kind == "shared":
            traces.append(jnp.zeros((k, n, math.prod(param.shape)), leaf.dtype))
        else:
            traces.append(jnp.zeros((k, *param.shape), leaf.dtype))
    return tuple(traces)


def _param_view(structure: CellStructure, kind: str, jacobian: jax.Array) -> jax.Array:
    """A `(..., K, K, N)` Jacobian laid out to mix a parameter trace of this kind."""
    if kind == "shared":  # `(K, N, |p|)`
        return jacobian[..., None]
    return jacobian.reshape(*jacobian.shape[:-1], *structure.neuron_shape)


def step_param_traces(
    structure: CellStructure, lin: Linearisation, traces: tuple[jax.Array | None, ...]
) -> tuple[jax.Array | None, ...]:
    """The non-op parameters' traces after one step, computed in the state's dtype and stored
    in the trace's (the parameter's: a float16 decay of a float32 cell keeps a float16 trace)."""
    return tuple(
        None
        if trace is None
        else (mix(_param_view(structure, param.kind, lin.jacobian), trace) + immediate).astype(
            trace.dtype
        )
        for param, trace, immediate in zip(structure.params, traces, lin.param_sensitivities)
    )


def block_param_traces(
    structure: CellStructure,
    products: jax.Array,
    first: jax.Array,
    lins: Linearisation,
    traces: tuple[jax.Array | None, ...],
) -> tuple[jax.Array | None, ...]:
    """The non-op parameters' traces after a block, `Φ(C, 0) ε_0 + Σ_τ Φ(C, τ) ∂h_τ/∂p`."""
    new = []
    for param, trace, immediate in zip(structure.params, traces, lins.param_sensitivities):
        if trace is None:
            new.append(None)
            continue
        per_step = _param_view(structure, param.kind, products)
        carried = mix(_param_view(structure, param.kind, first), trace)
        summed = jnp.sum(jax.vmap(mix)(per_step, immediate), axis=0)
        new.append((carried + summed).astype(trace.dtype))
    return tuple(new)


def param_tangents(
    structure: CellStructure, traces: tuple[jax.Array | None, ...], tangents: list[jax.Array], dtype
) -> jax.Array:
    """`Σ_p ε_p ⋅ δp` over the non-op parameters, as `(K, N)` in `dtype` (the state's)."""
    k, n = structure.num_leaves, structure.num_neurons
    total = jnp.zeros((k, n), dtype)
    for param, trace, delta in zip(structure.params, traces, tangents):
        if trace is None:
            continue
        if param.kind == "shared":
            total = total + trace @ jnp.ravel(delta)
        else:
            total = total + (trace * delta[None]).reshape(k, n)
    return total
