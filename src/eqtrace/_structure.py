"""What the diagonal rules need to know about a cell, read from the code of its step.

The unit of analysis is the *call site*: one call of a synaptic op within a step. A cell may
declare its ops in any order, call them in another, and call one op several times; each call
is paired with its op by identity (the op's position among the cell's fields), never by
order. For each call site: the shapes of its input and output and the *owner map* (which
neuron each output element reaches). For each other parameter: whether it is per-neuron
(element-wise), a small shared parameter, or does not reach the state at all. Along the way it
checks the diagonal assumptions — the state Jacobian with every op's input cut is element-wise,
every op output reaches at most one neuron, an op's weights act only through its calls — and
collects typed violations. Every fact comes from the dependency pattern of the step's pullback
(`_sparsity.pullback_pattern`, docs/architecture.md §2), with floating values abstract, so no
value can hide a dependence. The analysis depends only on the cell's static structure, shapes
and integer or boolean fields; `eqtrace.prepare` runs it once per cell and the plan keeps the
result; `_memo.structural_memo` reuses it for a cell of the same structure (new weights).
The cell is run with its ops observed by `_probing.probed_call`.
"""

import collections
import dataclasses
import enum
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend import core as jcore

from ._memo import structural_memo
from ._ops import OpAlgebra, algebra, is_op
from ._probing import (
    call_sites,
    called_ops_spec,
    concrete,
    find_ops,
    other_params_spec,
    probed_call,
    random_like,
)
from ._sparsity import (
    decode_index,
    identity_colours,
    index_colours,
    jacobian_pattern,
    one_colour,
    pullback_pattern,
)


class ParamKind(enum.StrEnum):
    """How a diagonal rule traces a parameter outside the cell's called ops."""

    #: Of the neuron shape and acting element-wise: an exact per-neuron trace.
    ELEMENTWISE = "elementwise"
    #: Small (at most `MAX_SHARED_PARAM_SIZE` values) and shared: a dense `(|h|, |p|)` trace.
    SHARED = "shared"
    #: Does not reach the state: an exact gradient through `output`, no trace.
    READOUT = "readout"
    #: None of these: no diagonal trace covers it (the rules refuse the cell).
    UNSUPPORTED = "unsupported"


class ViolationKind(enum.StrEnum):
    """Which diagonal assumption a cell breaks."""

    OP_OUTPUT_MIXES = "an op output reaches several neurons"
    OP_THROUGH_OP_INPUT = "an op reaches the state only through another op's input"
    OP_FEEDS_OP = "an op's output acts on a traced op's input"
    STATE_MIXES = "the state Jacobian with op inputs cut is not element-wise"
    WEIGHTS_OUTSIDE_CALLS = "an op's weights act outside its calls"
    NOT_READ = "an op or parameter acts only on leaves the output does not read"
    PARAM_FEEDS_OP = "a parameter acts on an op's input"
    PARAM_UNTRACEABLE = "a parameter no diagonal trace covers"
    OUTPUT_NOT_OF_STATE = "the returned `y` is not `output(new_state)`"
    UNKNOWN_PRIMITIVE = "a primitive the analysis does not know"


@dataclasses.dataclass(frozen=True)
class Violation:
    """A broken diagonal assumption: its kind, what breaks it (an op, a parameter or a state
    leaf, by path) and the explanation in plain words (`str(violation)`)."""

    kind: ViolationKind
    subject: str
    message: str

    def __str__(self) -> str:
        return self.message


class StructureError(ValueError):
    """A cell's structure is outside what a rule can trace (the message names the op or the
    parameter, says why, and what to do): a deliberate refusal, raised before any step runs."""


#: Non-op parameters up to this size that are not per-neuron get a dense `(|h|, |p|)` trace.
MAX_SHARED_PARAM_SIZE = 64


def _by_value(value: Any) -> Any:
    """A hashable stand-in for a field of a structure record: arrays by shape, dtype and
    bytes, tuples element by element."""
    if isinstance(value, np.ndarray):
        return (value.shape, value.dtype.str, value.tobytes())
    if isinstance(value, tuple):
        return tuple(_by_value(v) for v in value)
    return value


class _ValueRecord:
    """Equality and hash by the values of the dataclass's fields, arrays included: a plan's
    rules hold their structure as a static field, which JAX may compare and hash."""

    def _key(self) -> tuple:
        return tuple(_by_value(getattr(self, f.name)) for f in dataclasses.fields(self))  # pyright: ignore

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._key() == self._key()  # pyright: ignore

    def __hash__(self) -> int:
        return hash(self._key())


@dataclasses.dataclass(frozen=True, eq=False)
class CallSite(_ValueRecord):
    """One call of a synaptic op within a step (an op called twice has two)."""

    #: The index of the op called, among the cell's ops in field order.
    op: int
    #: The op's path, with the call's rank when the op is called more than once.
    name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    #: The flat neuron index that each flat output element reaches.
    owners: np.ndarray
    #: Whether the call reaches the state at all; calls used only in `output` (read-outs)
    #: get exact gradients through the output and need no trace.
    traced: bool
    #: The first call site with the same `∂h/∂u` (itself if none): calls whose outputs are
    #: summed, as `W_in x + W_rec s`, share it, so pp-prop keeps one output trace for them.
    sensitivity_source: int
    #: Per floating array of the op (in `jax.tree_util.tree_leaves` order), `None` if each
    #: of its weights reaches at most one output element (dense, embedding, grouped: the
    #: weight-shaped trace), else its `Reach` (a convolution's kernel, the `V` of `U (V a)`:
    #: one trace per output element reached and weight).
    reach: tuple["Reach | None", ...]
    #: Whether the op's output is linear in its weights (JAX can transpose its `apply` in
    #: them), which the weight-shaped traces assume: not for `softplus(raw) @ a`.
    linear_in_weights: bool = True

    @property
    def weights_reach_one_output(self) -> bool:
        """Whether every weight of the op reaches a single output element, so that the
        trace of each of its arrays is weight-shaped."""
        return all(r is None or r.count <= 1 for r in self.reach)


@dataclasses.dataclass(frozen=True, eq=False)
class Reach(_ValueRecord):
    """Which output elements each weight of one array of an op reaches, when some weight
    reaches several (a convolution's kernel weight reaches every position of its output
    channel; the `V` of `U (V a)` every output), read from the code of the op's `apply`
    (`_sparsity.pullback_pattern`), never from values. The outputs are coloured so that no
    weight reaches two outputs of one colour (greedily, in flat output order: for a
    convolution the colour is the output position); the array's trace then holds, per
    colour and weight, the trace of the one output of that colour the weight reaches:
    `(colours, *W.shape, K)`, one value per (output reached, weight) and state leaf."""

    #: The array's path within the op (e.g. `.weight`).
    path: str
    #: Shaped like the op's output: the colour of each output element.
    colours: np.ndarray
    #: `(colours, *W.shape)`: the flat output element of each colour that each weight
    #: reaches, `-1` where it reaches none.
    index: np.ndarray

    @property
    def count(self) -> int:
        return int(self.index.shape[0])

    @property
    def reached(self) -> int:
        """How many (output, weight) pairs the array's trace holds per state leaf."""
        return int(np.sum(self.index >= 0))


@dataclasses.dataclass(frozen=True)
class HeldOp:
    """A synaptic op held by the cell (called or not)."""

    path: str
    type_name: str
    called: bool


@dataclasses.dataclass(frozen=True)
class OtherParam:
    """A floating array of the cell outside its called ops."""

    path: str
    shape: tuple[int, ...]
    kind: ParamKind
    #: Whether `output` reads it directly (not only through the state).
    read_by_output: bool = False


@dataclasses.dataclass(frozen=True)
class CellStructure:
    """What the diagonal rules know about a cell: its state leaves, the ops it holds, each call
    of an op in a step, each other parameter, and the broken assumptions in plain words."""

    cell_name: str
    state_paths: tuple[str, ...]
    neuron_shape: tuple[int, ...]
    ops: tuple[HeldOp, ...]
    sites: tuple[CallSite, ...]
    params: tuple[OtherParam, ...]
    violations: tuple[Violation, ...]
    #: Which neuron each op input element depends on: analysed for SnAp-1 only (its
    #: `cell_structure`), `None` for the other rules.
    input_owners: "InputOwners | None" = None
    #: Whether the cell's leak and drive are constants, and their values: analysed for OTTT
    #: only (its `cell_structure`), `None` for the other rules.
    constant_leak: "ConstantLeak | None" = None

    @property
    def num_leaves(self) -> int:
        return len(self.state_paths)

    @property
    def num_neurons(self) -> int:
        return math.prod(self.neuron_shape)

    @property
    def op_called(self) -> tuple[bool, ...]:
        return tuple(op.called for op in self.ops)

    @property
    def site_ops(self) -> tuple[int, ...]:
        """The op index of each call site, in call order (what `probed_call` checks)."""
        return tuple(site.op for site in self.sites)

    def site_modules(self, cell) -> list[Any]:
        """The op module of each call site of `cell` (or of a tangent shaped like it)."""
        return _site_modules(cell, self.site_ops)

    def split_tangent(self, params_tangent) -> tuple[list[Any], list[jax.Array]]:
        """Splits a parameter tangent (a copy of the cell holding tangents in place of its
        arrays) into the tangent of each call site's op and the leaves of the non-op
        parameters, in the cell's traversal order."""
        others = eqx.filter(params_tangent, other_params_spec(params_tangent, self.op_called))
        return self.site_modules(params_tangent), jtu.tree_leaves(others)

    def other_params(self, cell) -> list[jax.Array]:
        return jtu.tree_leaves(eqx.filter(cell, other_params_spec(cell, self.op_called)))


@structural_memo(3)
def analyse(cell, state, x) -> CellStructure:
    """The structure of `cell`, read from the code of its step (`eqtrace.prepare` calls it once
    per cell and the plan keeps it; memoised on exactly what it reads), also inside a trace,
    where it reads only shapes and the cell's concrete integer and boolean arrays."""
    with jax.ensure_compile_time_eval():
        return _analyse(cell, state, concrete(x))


def _flat(tree) -> jax.Array:
    return jnp.stack([jnp.ravel(leaf) for leaf in jtu.tree_leaves(tree)])


def _abstract(tree):
    """`tree` with its arrays replaced by their shapes and dtypes."""
    return jtu.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype) if eqx.is_array(a) else a, tree
    )


class _Patterns:
    """The dependency patterns the analysis reads, from the code of one step of the cell
    (`_sparsity.pullback_pattern`): boolean arrays laid out as `jax.jacrev` lays out the
    Jacobians, each true wherever the derivative can be non-zero for some value."""

    def __init__(self, cell, state, x, sites, called, records):
        self.cell_name = type(cell).__name__
        num_leaves = len(jtu.tree_leaves(state))
        num_neurons = math.prod(jnp.shape(jtu.tree_leaves(state)[0]))
        self.state_shape = (num_leaves, num_neurons)
        params, rest = eqx.partition(cell, other_params_spec(cell, called))
        param_leaves, param_def = jtu.tree_flatten(params)
        probes = [jax.ShapeDtypeStruct(u.shape, u.dtype) for _, u in records]
        outputs = list(probes)
        self.unknown: set[str] = set()

        def run(cut, s, probes, param_leaves, rest, x):
            cell = eqx.combine(jtu.tree_unflatten(param_def, param_leaves), rest)
            new_state, _ = probed_call(cell, s, x, probes, cut=cut, sites=sites)
            return _flat(new_state)

        args = (state, probes, param_leaves, rest, x)
        full = self._pattern(lambda *a: run(False, *a), args, (1, 2), identity_colours, (3,))
        cut = self._pattern(lambda *a: run(True, *a), args, (0, 1, 2), identity_colours, (3,))

        def as_jacobian(leaves):
            return [jacobian_pattern(leaf, self.state_shape) for leaf in leaves]

        self.probe, self.full = as_jacobian(full[0]), as_jacobian(full[1])
        self.state, self.probe_cut, self.cut = (as_jacobian(leaves) for leaves in cut)

        # With every call's output replayed, an op's weights must not change the state: if
        # they do, they act outside a call (e.g. `op.weight @ h`), which no op trace covers.
        op_arrays, others = eqx.partition(cell, called_ops_spec(cell, called))

        def replayed(op_arrays, others, s, x, outputs):
            cell = eqx.combine(op_arrays, others)
            return _flat(probed_call(cell, s, x, cut=False, outputs=outputs, sites=sites)[0])

        (outside,) = self._pattern(
            replayed, (op_arrays, others, state, x, outputs), (0,), one_colour, (1,)
        )
        op_nodes = [n for n in jtu.tree_leaves(op_arrays, is_leaf=is_op) if is_op(n)]
        leaf_counts = [len(jtu.tree_leaves(n)) for n in op_nodes]
        starts = np.cumsum([0, *leaf_counts])
        self.op_used_outside = np.array(
            [
                any(leaf.any() for leaf in outside[starts[i] : starts[i + 1]])
                for i in range(len(op_nodes))
            ],
            bool,
        )

        # Which state leaves and parameters the output reads: the online gradient enters the
        # traces there.
        def read(s, param_leaves, rest):
            cell = eqx.combine(jtu.tree_unflatten(param_def, param_leaves), rest)
            return jtu.tree_leaves(eqx.filter(cell.output(s), eqx.is_inexact_array))

        output, output_params = self._pattern(
            read, (state, param_leaves, rest), (0, 1), one_colour, (2,)
        )
        self.leaf_read = np.array([leaf.any() for leaf in output], bool)
        self.param_read_by_output = [bool(leaf.any()) for leaf in output_params]

    def _pattern(self, fun, args, wrt, colours, known):
        try:
            pattern = pullback_pattern(fun, args, wrt, colours, known)
        except Exception as error:  # noqa: BLE001 - the rules cannot run such a cell either
            raise StructureError(
                f"{self.cell_name}: the structure analysis cannot differentiate one step of the "
                f"cell ({type(error).__name__}: {str(error).splitlines()[0]}), so the diagonal "
                "rules cannot trace it. Make the step differentiable in forward or reverse "
                "mode (a `lax.scan` or a `fori_loop` with static bounds instead of a "
                "`while_loop`), or use `eqtrace.RTRL()`."
            ) from error
        self.unknown.update(pattern.unknown)
        return pattern.leaves


def _shared_sensitivities(cell, state, x, sites, records) -> np.ndarray:
    """`shared[i, j]`: calls `i` and `j` have the same `∂h/∂u`, read from the code: each
    call's output (with its probe added) reaches the state only through one chain of sums
    (`W_in x + W_rec s + b`) whose every intermediate has no other use, and the chains of the
    two calls meet. Then `∂h/∂u_i = ∂h/∂(the sum) = ∂h/∂u_j`, and pp-prop keeps one output
    trace for both. Any other use (a product, a second use, a sum that broadcasts) is read as
    a sensitivity of its own: one trace more, never a wrong one."""
    probes = [jax.ShapeDtypeStruct(u.shape, u.dtype) for _, u in records]

    arrays, rest = eqx.partition((cell, state, x), eqx.is_array)

    def run(probes, arrays):
        cell, s, x = eqx.combine(arrays, rest)
        return probed_call(cell, s, x, probes, cut=False, sites=sites)[0]

    closed = jax.make_jaxpr(run)(probes, _abstract(arrays))
    jaxpr = closed.jaxpr
    uses: dict[Any, list[Any]] = collections.defaultdict(list)
    for eqn in jaxpr.eqns:
        for atom in eqn.invars:
            if not isinstance(atom, jcore.Literal):
                uses[atom].append(eqn)
    returned = {atom for atom in jaxpr.outvars if not isinstance(atom, jcore.Literal)}

    def root(var):
        while len(uses[var]) == 1 and var not in returned:
            (eqn,) = uses[var]
            first = eqn.invars[0] is var
            summed = eqn.primitive.name in ("add", "add_any") or (
                eqn.primitive.name == "sub" and first
            )
            if not summed or eqn.outvars[0].aval.shape != var.aval.shape:
                break
            if eqn.invars[0] is eqn.invars[1]:
                break  # `u + u`: twice the sensitivity
            var = eqn.outvars[0]
        return var

    roots = [root(var) for var in jaxpr.invars[: len(probes)]]
    n = len(roots)
    shared = np.eye(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            shared[i, j] |= roots[i] is roots[j] and probes[i].shape == probes[j].shape
    return shared


def require_output_readout(rule: str, cell, state, x) -> None:
    """Raises the refusal of rules that treat a cell as one system (RTRL, UORO) when the `y`
    its `__call__` returns is not `output(new_state)`."""
    if output_mismatch(cell, state, x):
        raise ValueError(
            f"{rule} cannot run {type(cell).__name__}: the `y` its `__call__` returns differs "
            "from `output(new_state)`, but an online step returns `output(new_state)` and "
            "takes the gradient there, so outputs and gradients would not be the model's. "
            "Return `(new_state, self.output(new_state))` from `__call__`, and define "
            "`output` as the cell's read-out of its state."
        )


def output_mismatch(model, state, x) -> bool:
    """Whether the `y` that `model(state, x)` returns differs from `model.output(new_state)`
    on random floating values, integer and boolean arrays at their own. This compares two
    functions' values; it is not a dependence, which the analysis reads from the code."""
    x = concrete(x)
    rng = np.random.default_rng(1)
    mismatch = False
    with jax.ensure_compile_time_eval():
        for scale in (0.5, 2.0):
            draws = [random_like(tree, rng, scale) for tree in (model, state, x)]
            mismatch |= not _outputs_agree(*draws)
    return mismatch


@eqx.filter_jit
def _output_pair(model, state, x):
    new_state, y = model(state, x)
    return y, model.output(new_state)


def _outputs_agree(model, state, x) -> bool:
    y, from_state = _output_pair(model, state, x)
    if jtu.tree_structure(y) != jtu.tree_structure(from_state):
        return False
    return all(
        np.shape(a) == np.shape(b) and np.allclose(a, b, equal_nan=True)
        for a, b in zip(jtu.tree_leaves(y), jtu.tree_leaves(from_state))
    )


def _require_real_leaves(name: str, paths, leaves) -> None:
    """Refuses integer, boolean and complex state leaves, which the analysis's real Jacobians
    cannot differentiate."""
    dtypes = [jnp.result_type(leaf) for leaf in leaves]
    discrete = [
        f"`{path}` is {dtype.name}"
        for path, dtype in zip(paths, dtypes)
        if not jnp.issubdtype(dtype, jnp.inexact)
    ]
    if discrete:
        raise StructureError(
            f"{name}: the diagonal rules differentiate every state leaf, but "
            + ", ".join(discrete)
            + ". Hold the leaf as a floating array of the neuron shape (a count or a flag "
            "compared with `>`, `==` or `jnp.where` gets a zero derivative, as it should), or "
            "use `eqtrace.RTRL()` or `eqtrace.UORO()` for this cell."
        )
    complex_ = [
        f"`{path}`"
        for path, dtype in zip(paths, dtypes)
        if jnp.issubdtype(dtype, jnp.complexfloating)
    ]
    if complex_:
        raise StructureError(
            f"{name}: the diagonal rules need real state leaves, but these are complex: "
            + ", ".join(complex_)
            + ". Hold each complex leaf as two real leaves, its real and imaginary "
            "parts (as `eqtrace.nn.LRUCell` does), or use `eqtrace.RTRL()` or `eqtrace.UORO()` "
            "for this cell."
        )


@dataclasses.dataclass(frozen=True)
class _Names:
    """What the analysis reports in: the cell's name, its state leaves and neuron shape, its
    ops, the op index of each call site, and its other parameters, by path."""

    cell: str
    state_paths: tuple[str, ...]
    neuron_shape: tuple[int, ...]
    op_paths: tuple[str, ...]
    sites: tuple[int, ...]
    param_paths: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]

    @property
    def num_leaves(self) -> int:
        return len(self.state_paths)

    @property
    def num_neurons(self) -> int:
        return math.prod(self.neuron_shape)

    def site(self, site: int) -> str:
        return _site_name(self.op_paths, self.sites, site)


def _analyse(cell, state, x) -> CellStructure:
    """The structure of `cell`: its layout, then one check per diagonal assumption, each
    reading the dependency patterns of the step (`_Patterns`)."""
    names, called, records = _layout(cell, state, x)
    patterns = _Patterns(cell, state, x, names.sites, called, records)
    owners, traced, violations = _call_owners(names, patterns)
    leaf_link, mixing = _state_mixing(names, patterns)
    kinds, param_violations = _param_kinds(names, patterns)
    violations += mixing
    violations += _fed_op_inputs(cell, state, x, names, called, records, traced)
    violations += _weights_outside_calls(names, patterns)
    violations += _unread(names, patterns, leaf_link)
    violations += param_violations
    violations += _output_of_state(cell, state, x, names)
    violations += _unknown_primitives(patterns, violations)
    same_sensitivity = _shared_sensitivities(cell, state, x, names.sites, records)
    site_ops = _site_modules(cell, names.sites)
    return CellStructure(
        cell_name=names.cell,
        state_paths=names.state_paths,
        neuron_shape=names.neuron_shape,
        ops=tuple(
            HeldOp(path=path, type_name=type(op).__name__, called=is_called)
            for (path, op), is_called in zip(find_ops(cell), called)
        ),
        sites=tuple(
            CallSite(
                op=names.sites[site],
                name=names.site(site),
                input_shape=tuple(a.shape),
                output_shape=tuple(u.shape),
                owners=owners[site],
                traced=traced[site],
                sensitivity_source=int(np.argmax(same_sensitivity[site])),
                reach=_weight_reach(op, a),
                linear_in_weights=_linear_in_weights(op, a),
            )
            for site, (op, (a, u)) in enumerate(zip(site_ops, records))
        ),
        params=tuple(
            OtherParam(path=path, shape=shape, kind=kind, read_by_output=read)
            for path, shape, kind, read in zip(
                names.param_paths, names.param_shapes, kinds, patterns.param_read_by_output
            )
        ),
        violations=tuple(violations),
    )


def _layout(cell, state, x) -> tuple[_Names, tuple[bool, ...], Any]:
    """The names, which ops are called, and the shapes of each call's input and output
    (`(a, u)` records, from shapes only); refuses state leaves that are not real arrays of
    one neuron shape, ops called inside a transformation within the cell and ops called
    with weights other than their own arrays."""
    name = type(cell).__name__
    leaves_with_paths = jtu.tree_leaves_with_path(state)
    state_paths = tuple(f"state{jtu.keystr(p)}" for p, _ in leaves_with_paths)
    _require_real_leaves(name, state_paths, [leaf for _, leaf in leaves_with_paths])
    shapes = {tuple(jnp.shape(leaf)) for _, leaf in leaves_with_paths}
    if len(shapes) != 1:
        raise StructureError(
            f"{name}: the diagonal rules need every state leaf of a cell to have one neuron shape "
            f"(a K-by-K block per neuron), but the leaves {list(state_paths)} have shapes "
            f"{[tuple(jnp.shape(s)) for _, s in leaves_with_paths]}. Give all leaves the "
            "same shape, or use `eqtrace.RTRL()` for this cell."
        )
    (neuron_shape,) = shapes
    op_paths = tuple(path for path, _ in find_ops(cell))
    sites, nested, rebuilt = call_sites(cell, state, x)
    if nested:
        raise StructureError(
            f"{name}: a synaptic op is called inside a JAX transformation within the cell ("
            + ", ".join(f"`{op_paths[i]}`" for i in nested)
            + ", e.g. in `jax.vmap(self.op)(xs)`, a `lax.cond` branch or a `lax.scan`), so its "
            "calls cannot be traced one by one. Call each op directly on its input (select "
            "between results with `jnp.where`; a convolution such as `eqx.nn.Conv1d` with "
            "kernel size 1 applies one weight matrix at many positions), or use "
            "`eqtrace.RTRL()` for this cell."
        )
    if rebuilt:
        # The op traces take each call to compute with the op's own arrays; a call of a
        # rebuilt copy passes every pattern check (its output depends on the held arrays)
        # while its weights act through the rebuilding too: `eqx.nn.WeightNorm`'s `v` got the
        # gradient of `v x`, and `eqx.nn.Shared`'s placeholder crashed the analysis.
        raise StructureError(
            f"{name}: a synaptic op is called with weights or masks other than its own arrays ("
            + ", ".join(f"`{op_paths[i]}`" for i in rebuilt)
            + "): a copy of it is rebuilt before the call (as `eqx.nn.WeightNorm` and "
            "`eqx.nn.Shared` do, or `eqx.tree_at` on the op), so its weights act through that "
            "rebuilding as well as through the call, which the op traces do not follow. "
            "Compute such weights inside a registered op's `__call__` "
            "(`eqtrace.register_op`), or use `eqtrace.RTRL()` for this cell."
        )
    called = tuple(i in sites for i in range(len(op_paths)))
    params_with_paths = jtu.tree_leaves_with_path(eqx.filter(cell, other_params_spec(cell, called)))
    names = _Names(
        cell=name,
        state_paths=state_paths,
        neuron_shape=neuron_shape,
        op_paths=op_paths,
        sites=tuple(sites),
        param_paths=tuple(jtu.keystr(p) for p, _ in params_with_paths),
        param_shapes=tuple(tuple(jnp.shape(leaf)) for _, leaf in params_with_paths),
    )
    # Shapes only: no value of the cell, state or input enters the analysis.
    _, records = eqx.filter_eval_shape(
        lambda c, s, x: probed_call(c, s, x, cut=True, sites=sites), cell, state, x
    )
    return names, called, records


def _call_owners(names: _Names, patterns: _Patterns) -> tuple[list, list[bool], list]:
    """Assumption: every op output element reaches at most one neuron, through element-wise
    operations. Returns each call's owner map (the flat neuron each output element reaches;
    an element that reaches none is never read), whether the call reaches the state at all,
    and the violations."""
    k, n = names.num_leaves, names.num_neurons
    owners, traced, violations = [], [], []
    for site, (jac, jac_cut) in enumerate(zip(patterns.probe, patterns.probe_cut)):
        hits = jac.reshape(k, n, -1).any(axis=0)  # (neuron, output element)
        counts = hits.sum(axis=0)
        subject = names.site(site)
        for j in np.flatnonzero(counts > 1)[:1]:
            if not jac_cut.any():
                violations.append(
                    Violation(
                        ViolationKind.OP_THROUGH_OP_INPUT,
                        subject,
                        f"the op `{subject}` reaches the state only through the input of "
                        f"another op (output element {j} reaches {counts[j]} neurons that way); "
                        "the diagonal rules cut op inputs, so its weights would get no "
                        "gradient. A layer that transforms the input (an `eqx.nn.MLP` on `x`) "
                        "belongs before the cell, in `eqtrace.nn.Sequential`, where its "
                        "gradient is exact; ops chained after an op (an `eqx.nn.MLP` on its "
                        "output) mix neurons, which only `eqtrace.RTRL()` traces.",
                    )
                )
                continue
            violations.append(
                Violation(
                    ViolationKind.OP_OUTPUT_MIXES,
                    subject,
                    f"output element {j} of the op `{subject}` reaches {counts[j]} neurons "
                    f"({np.flatnonzero(hits[:, j])[:4].tolist()}…); each op output must reach one "
                    "neuron through element-wise operations (mixing after the op is not "
                    "diagonal).",
                )
            )
        owners.append(np.where(counts == 1, np.argmax(hits, axis=0), 0).astype(np.int32))
        traced.append(bool(hits.any()))
    return owners, traced, violations


def _state_mixing(names: _Names, patterns: _Patterns) -> tuple[np.ndarray, list]:
    """Assumption: with every op's input cut, the state Jacobian is element-wise within each
    pair of leaves. Returns which leaves reach which (`link[k, m]`: `h^m_{t-1}` reaches
    `h^k_t`) and the violations."""
    k, n = names.num_leaves, names.num_neurons
    link = np.zeros((k, k), bool)
    violations = []
    for m, block in enumerate(patterns.state):
        block = block.reshape(k, n, n)
        link[:, m] = block.any(axis=(1, 2))
        mixes = np.any(block & ~np.eye(n, dtype=bool), axis=(1, 2))
        for leaf in np.flatnonzero(mixes):
            violations.append((leaf, m))
    violations.sort()
    return link, [
        Violation(
            ViolationKind.STATE_MIXES,
            names.state_paths[leaf],
            f"`{names.state_paths[leaf]}` depends on other neurons' `{names.state_paths[m]}` "
            "outside a synaptic op (e.g. jnp.roll, a reduction, or a matmul that is not a "
            "recognised op), so the state Jacobian is not element-wise.",
        )
        for leaf, m in violations
    ]


def _fed_op_inputs(cell, state, x, names: _Names, called, records, traced) -> list:
    """Assumption: within a step, no op output and no parameter outside the ops acts on the
    input of a traced op. The rules cut every op's input, so such a path is dropped from the
    immediate term, and a direct path of the same source to the same neurons would hide it
    from every other check (a gain that scales the drive and also an op's input)."""
    targets = [i for i, is_traced in enumerate(traced) if is_traced]
    if not targets:
        return []
    probes = [jax.ShapeDtypeStruct(u.shape, u.dtype) for _, u in records]
    params, rest = eqx.partition(cell, other_params_spec(cell, called))
    param_leaves, param_def = jtu.tree_flatten(params)

    def inputs(probes, param_leaves, rest, s, x):
        cell = eqx.combine(jtu.tree_unflatten(param_def, param_leaves), rest)
        _, calls = probed_call(cell, s, x, probes, cut=False, sites=names.sites)
        return [calls[i][0] for i in targets]

    try:
        from_probes, from_params = pullback_pattern(
            inputs, (probes, param_leaves, rest, state, x), (0, 1), one_colour, (2,)
        ).leaves
    except Exception as error:  # noqa: BLE001 - as for the other patterns
        raise StructureError(
            f"{names.cell}: the structure analysis cannot differentiate the op inputs of one "
            f"step ({type(error).__name__}: {str(error).splitlines()[0]}). Use `eqtrace.RTRL()`."
        ) from error
    violations = [
        Violation(
            ViolationKind.OP_FEEDS_OP,
            names.site(site),
            f"the output of the op `{names.site(site)}` acts on the input of a traced op within "
            "the step (e.g. `op2(tanh(op1(x)))`); the diagonal rules cut op inputs and would "
            "miss that path. Sum the ops' outputs instead, move the first op into a layer "
            "before the cell, or use `eqtrace.RTRL()`.",
        )
        for site, leaf in enumerate(from_probes)
        if leaf.any()
    ]
    violations += [
        Violation(
            ViolationKind.PARAM_FEEDS_OP,
            path,
            f"the parameter `{path}` acts on the input of a synaptic op; the diagonal rules cut "
            "op inputs and would miss that path.",
        )
        for path, leaf in zip(names.param_paths, from_params)
        if leaf.any()
    ]
    return violations


def _weights_outside_calls(names: _Names, patterns: _Patterns) -> list:
    """Assumption: an op's weights change the state only through calls of the op."""
    return [
        Violation(
            ViolationKind.WEIGHTS_OUTSIDE_CALLS,
            names.op_paths[i],
            f"the weights of the op `{names.op_paths[i]}` change the state other than through "
            "calls of the op (e.g. `op.weight @ h`); the op traces only cover its calls. Call "
            "the op, or hold such weights as a separate parameter.",
        )
        for i in np.flatnonzero(patterns.op_used_outside)
    ]


def _unread(names: _Names, patterns: _Patterns, link: np.ndarray) -> list:
    """Assumption: every call and parameter reaches the output through the traces. The online
    gradient enters a trace through the leaves `output` reads, and through the leaves that
    reach those over time by the cut Jacobian; a call or parameter acting only on other
    leaves (which reach the output only through an op's input, a path the rules cut) would
    get an exactly zero gradient."""
    k = names.num_leaves
    reached = patterns.leaf_read.copy()
    for _ in range(k):
        reached |= np.any(link & reached[:, None], axis=0)
    unreached = [names.state_paths[i] for i in np.flatnonzero(~reached)]
    why = (
        "which reach the cell's output only through the input of a synaptic op (a path the "
        "diagonal rules cut), so it would get a zero gradient. Make `output` read those "
        "leaves, or use `eqtrace.RTRL()`."
    )
    acting = [
        (names.site(site), f"the op `{names.site(site)}`", jac.reshape(k, -1).any(axis=1))
        for site, jac in enumerate(patterns.probe)
    ] + [
        (path, f"the parameter `{path}`", jac.reshape(k, -1).any(axis=1))
        for path, jac in zip(names.param_paths, patterns.cut)
    ]
    return [
        Violation(
            ViolationKind.NOT_READ,
            subject,
            f"{what} acts only on the state leaves {unreached}, {why}",
        )
        for subject, what, leaves in acting
        if leaves.any() and not (leaves & reached).any()
    ]


def _param_kinds(names: _Names, patterns: _Patterns) -> tuple[list[ParamKind], list]:
    """How each parameter outside the called ops is traced, and the violations of the
    assumption on them: each is per-neuron (of the neuron shape, acting element-wise), small
    and shared, or reaches the output only."""
    k, n = names.num_leaves, names.num_neurons
    kinds, violations = [], []
    for path, shape, cut, full in zip(
        names.param_paths, names.param_shapes, patterns.cut, patterns.full
    ):
        elementwise = shape == names.neuron_shape and not np.any(
            cut.reshape(k, n, n) & ~np.eye(n, dtype=bool)
        )
        if not full.any():
            kinds.append(ParamKind.READOUT)
        elif elementwise:
            kinds.append(ParamKind.ELEMENTWISE)
        elif math.prod(shape) <= MAX_SHARED_PARAM_SIZE:
            kinds.append(ParamKind.SHARED)
        else:
            kinds.append(ParamKind.UNSUPPORTED)
            violations.append(
                Violation(
                    ViolationKind.PARAM_UNTRACEABLE,
                    path,
                    f"the parameter `{path}` (shape {shape}) is neither per-neuron (shape "
                    f"{names.neuron_shape}, acting element-wise) nor a small shared parameter "
                    f"(at most {MAX_SHARED_PARAM_SIZE} values) nor inside a called synaptic op, "
                    "so no diagonal trace covers it.",
                )
            )
    return kinds, violations


def _output_of_state(cell, state, x, names: _Names) -> list:
    """Assumption: the `y` that `__call__` returns is `output(new_state)`."""
    if not output_mismatch(cell, state, x):
        return []
    return [
        Violation(
            ViolationKind.OUTPUT_NOT_OF_STATE,
            names.cell,
            "the `y` returned by `__call__` differs from `output(new_state)`; online rules "
            "need the output to be a function of the new state, given by `output`.",
        )
    ]


def _unknown_primitives(patterns: _Patterns, violations: list) -> list:
    """A note beside the violations when the analysis met primitives it does not know (it
    took them as dense, which may be what broke an assumption)."""
    if not (patterns.unknown and violations):
        return []
    unknown = sorted(patterns.unknown)
    return [
        Violation(
            ViolationKind.UNKNOWN_PRIMITIVE,
            ", ".join(unknown),
            "the analysis does not know the primitive(s) "
            + ", ".join(f"`{p}`" for p in unknown)
            + ", so it took every output of them to depend on every input; the violations "
            "above may come from them. Express that step with jax.numpy operations, or use "
            "`eqtrace.RTRL()`.",
        )
    ]


def _site_modules(cell, sites) -> list[Any]:
    """The op module of each call site (`sites`: the op index of each call)."""
    ops = [op for _, op in find_ops(cell)]
    return [ops[i] for i in sites]


def _weight_reach(op, a) -> tuple[Reach | None, ...]:
    """Per floating array of `op`, `None` if each of its weights reaches at most one output
    element (dense, embedding), else its `Reach`; read from the code of the op's `apply`.
    A cheap pattern first (`2·log2|u|` colours tell none, one or several per weight); the
    full pattern (a colour per output) only for an op with a weight that reaches several."""
    rules = algebra(op)
    params, static = eqx.partition(op, eqx.is_inexact_array)

    def apply(params, static, a):
        return rules.apply(eqx.combine(params, static), a)

    def index(outputs):
        return [
            index_colours(np.arange(math.prod(o.shape)).reshape(o.shape), math.prod(o.shape))
            for o in outputs
        ]

    args = (params, static, a)
    (cheap,) = pullback_pattern(apply, args, (0,), index, known=(1,)).leaves
    owners = [decode_index(leaf) for leaf in cheap]
    several = [bool(np.any(o == -2)) for o in owners]
    paths = [jtu.keystr(p) for p, _ in jtu.tree_leaves_with_path(params)]
    output_shape = jax.eval_shape(apply, *args).shape
    # The derived `spread` and `contract` read `∂u_j/∂W_w` at an input of ones as 1 (true of
    # dense-like ops, not of `U (V a)` or `2 W a`): an algebra without its own takes the
    # structural layout for every array, one colour where each weight reaches one output.
    own = type(rules).spread is not OpAlgebra.spread and type(rules).contract is not (
        OpAlgebra.contract
    )
    single = [
        None if own else Reach(path=path, colours=np.zeros(output_shape, np.int32), index=o[None])
        for path, o in zip(paths, owners)
    ]
    if not any(several):
        return tuple(single)
    (full,) = pullback_pattern(apply, args, (0,), identity_colours, known=(1,)).leaves
    return tuple(
        _reach(path, leaf, output_shape) if many else one
        for path, leaf, many, one in zip(paths, full, several, single)
    )


def _reach(path: str, pattern: np.ndarray, output_shape: tuple[int, ...]) -> Reach:
    """The `Reach` of an array from its pattern `(*W.shape, |u|)`: outputs coloured greedily
    in flat order, each taking the smallest colour that no output sharing a weight with it
    has."""
    shape, size = pattern.shape[:-1], pattern.shape[-1]
    flat = pattern.reshape(-1, size)
    counts = flat.astype(np.int32)
    conflicts = (counts.T @ counts) > 0  # outputs that share a weight
    colours = np.full(size, -1, np.int32)
    for j in range(size):
        taken = colours[conflicts[j] & (colours >= 0)]
        free = np.setdiff1d(np.arange(taken.size + 1), taken)
        colours[j] = free[0]
    weights, outputs = np.nonzero(flat)
    index = np.full((int(colours.max()) + 1, flat.shape[0]), -1, np.int32)
    index[colours[outputs], weights] = outputs
    return Reach(path=path, colours=colours.reshape(output_shape), index=index.reshape(-1, *shape))


def _linear_in_weights(op, a) -> bool:
    """Whether `op`'s `apply` is linear in each of its floating arrays, the others held
    fixed (a low-rank `U (V a)` is, jointly bilinear), read from its code: JAX transposes it
    with respect to each (shapes only; a non-linear primitive on the weights, such as
    `softplus(raw)`, makes the transpose fail)."""
    rules = algebra(op)
    params, static = eqx.partition(op, eqx.is_inexact_array)
    leaves, treedef = jtu.tree_flatten(params)
    a = jnp.zeros(a.shape, a.dtype)

    def linear_in(i):
        def check(leaves):
            def apply(leaf):
                held = [*leaves[:i], leaf, *leaves[i + 1 :]]
                return rules.apply(eqx.combine(jtu.tree_unflatten(treedef, held), static), a)

            transpose = jax.linear_transpose(apply, leaves[i])
            out = jax.eval_shape(apply, leaves[i])
            return transpose(jnp.zeros(out.shape, out.dtype))

        jax.eval_shape(check, leaves)

    try:
        for i in range(len(leaves)):
            linear_in(i)
    except Exception:  # noqa: BLE001 - JAX's transpose fails in several ways on non-linear code
        return False
    return True


def _site_name(op_paths, sites, site) -> str:
    """The op's path, with the call's rank when the op is called more than once."""
    uses = [s for s, o in enumerate(sites) if o == sites[site]]
    path = op_paths[sites[site]]
    return path if len(uses) == 1 else f"{path} (call {uses.index(site) + 1} of {len(uses)})"


@dataclasses.dataclass(frozen=True, eq=False)
class InputOwners(_ValueRecord):
    """Which neuron's state each input element of each call site depends on (what SnAp-1's
    self-paths go through), read from the code like the output owners."""

    #: Per call site, the flat neuron index of each flat input element: `-1` if it depends on
    #: no neuron's state (an input `x`) or on several.
    owners: tuple[np.ndarray, ...]
    #: Per call site, how many input elements depend on several neurons' states.
    shared: tuple[int, ...]


@structural_memo(3)
def input_owners(cell, state, x, structure: CellStructure) -> InputOwners:
    """The input owners of `cell`'s call sites (SnAp-1 analyses them with the structure). An
    input element depends on a neuron through the previous state directly, or through the
    output of an earlier call (owned by that neuron), not through the op inputs before those
    calls."""
    with jax.ensure_compile_time_eval():
        return _input_owners(cell, state, concrete(x), structure)


def _input_owners(cell, state, x, structure: CellStructure) -> InputOwners:
    if not structure.sites:  # No op calls (parameters outside ops only): nothing to own.
        return InputOwners(owners=(), shared=())
    n = structure.num_neurons
    sites = structure.site_ops
    _, records = eqx.filter_eval_shape(
        lambda c, s, x: probed_call(c, s, x, cut=False, sites=sites), cell, state, x
    )
    outputs = [jax.ShapeDtypeStruct(u.shape, u.dtype) for _, u in records]

    # Each call's input, with every output replayed (so that an output does not depend on
    # its own op's input) and probed: `∂a/∂h_{t-1}` directly and through earlier outputs.
    def inputs(s, probes, cell, x, replayed):
        _, records = probed_call(cell, s, x, probes, cut=False, outputs=replayed, sites=sites)
        return [a for a, _ in records]

    d_state, d_probes = pullback_pattern(
        inputs, (state, outputs, cell, x, outputs), (0, 1), identity_colours, known=(2,)
    ).leaves
    sizes = [math.prod(site.input_shape) for site in structure.sites]
    starts = np.cumsum([0, *sizes])
    hits = [np.zeros((size, n), bool) for size in sizes]
    for i in range(len(sizes)):
        columns = slice(starts[i], starts[i + 1])
        for leaf in d_state:
            hits[i] |= leaf.reshape(n, -1)[:, columns].T
        for site, leaf in zip(structure.sites, d_probes):
            if site.traced:
                rows, elements = np.nonzero(leaf.reshape(-1, leaf.shape[-1])[:, columns].T)
                hits[i][rows, site.owners[elements]] = True
    counts = [h.sum(axis=1) for h in hits]
    return InputOwners(
        owners=tuple(
            np.where(c == 1, np.argmax(h, axis=1), -1).astype(np.int32)
            for h, c in zip(hits, counts)
        ),
        shared=tuple(int(np.sum(c > 1)) for c in counts),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ConstantLeak(_ValueRecord):
    """Whether a cell is a leaky integrator of its ops' outputs with constant coefficients, the
    structure OTTT's presynaptic traces need: with every op output held fixed, the state
    Jacobian `D = ∂h_t/∂h_{t-1}` (the leak) and each traced call's `c = ∂h_t/∂u` (the drive)
    depend on no state, input or parameter, and are the same for every neuron and output
    element. The dependence is read from the code of the step's linearisation (a pattern of
    its second derivatives, `_sparsity.pullback_pattern`); only then are the values, which
    no draw can change, computed once."""

    #: `(K, K)`: `D[k, m]`, the leak shared by every neuron; `None` if there is none.
    leak: np.ndarray | None
    #: Per call site, `(K,)`: `∂h^k_t/∂u` for every output element; `None` for read-out
    #: calls and when there is no constant leak.
    drives: tuple[np.ndarray | None, ...]
    #: Why the cell is not such a leaky integrator, one sentence each (empty if it is).
    problems: tuple[str, ...]


@structural_memo(3)
def constant_leak(cell, state, x, structure: CellStructure) -> ConstantLeak:
    """The constant leak and drives of `cell` (OTTT analyses them with the structure), or
    the reasons it has none. It never raises: the rule refuses the cell with the reasons."""
    with jax.ensure_compile_time_eval():
        try:
            return _constant_leak(cell, state, concrete(x), structure)
        except Exception as error:  # noqa: BLE001 - a cell the analysis cannot read is refused
            reason = (
                "the analysis cannot differentiate the linearisation of one step "
                f"({type(error).__name__}: {str(error).splitlines()[0]})"
            )
            return ConstantLeak(leak=None, drives=(), problems=(reason,))


def _constant_leak(cell, state, x, structure: CellStructure) -> ConstantLeak:
    k, n = structure.num_leaves, structure.num_neurons
    sites = structure.site_ops
    arrays, rest = eqx.partition(cell, eqx.is_inexact_array)
    dtypes = [jnp.result_type(*jtu.tree_leaves(op)) for op in structure.site_modules(arrays)]

    def linearisation(state, x, arrays, rest):
        cell = eqx.combine(arrays, rest)
        probes = [jnp.zeros(site.output_shape, d) for site, d in zip(structure.sites, dtypes)]

        def transition(s, probes):
            return _flat(probed_call(cell, s, x, probes, cut=True, sites=sites)[0])

        new_state, pullback = jax.vjp(transition, state, probes)
        rows = jnp.repeat(jnp.eye(k, dtype=new_state.dtype)[:, :, None], n, axis=2)
        d_state, d_probes = jax.vmap(pullback)(rows)
        return _flat_rows(d_state, k, n), list(d_probes)

    # The values, not the derivatives, of the leak and the drives must be constant: a
    # `stop_gradient` (a detached reset, a cut op input) hides from a derivative what it
    # does not hide from a value (`α (1 - sg(s)) v` has the leak `α (1 - s)`).
    leak_sources, drive_sources = _value_sources(linearisation, (state, x, arrays), rest)
    state_paths = structure.state_paths
    x_paths = [f"the input `x{jtu.keystr(p)}`" for p, _ in jtu.tree_leaves_with_path(x)]
    array_paths = [f"`{jtu.keystr(p)}`" for p, _ in jtu.tree_leaves_with_path(arrays)]
    names = [f"`{p}`" for p in state_paths] + x_paths + array_paths
    problems = []
    for what, sources in (
        ("leak ∂h_t/∂h_{t-1} (op outputs held fixed)", leak_sources),
        ("drive ∂h_t/∂u", drive_sources),
    ):
        if sources:
            problems.append(f"its {what} depends on {', '.join(names[i] for i in sorted(sources))}")
    if problems:
        return ConstantLeak(leak=None, drives=(), problems=tuple(problems))

    # Constants: any point gives their values; ones keep divisions and logarithms finite.
    def ones(tree):
        return jtu.tree_map(lambda a: jnp.ones(jnp.shape(a), a.dtype), tree)

    leak, drives = linearisation(ones(state), ones(x), ones(arrays), rest)
    leak = np.asarray(leak)  # (K, K, N)
    if not np.all(np.isfinite(leak)) or not np.all(leak == leak[..., :1]):
        varying = [state_paths[i] for i in range(k) if not np.all(leak[i] == leak[i, :, :1])]
        return ConstantLeak(
            leak=None,
            drives=(),
            problems=(
                f"the leak of {varying} differs across the neurons (per-neuron time constants)",
            ),
        )
    values = []
    for site, drive in zip(structure.sites, drives):
        drive = np.asarray(drive).reshape(k, -1)
        if not site.traced:
            values.append(None)
            continue
        if not np.all(drive == drive[:, :1]):
            problems.append(
                f"the op `{site.name}` drives the state with a gain that differs across its "
                "output elements"
            )
        values.append(drive[:, 0].copy())
    return ConstantLeak(leak=leak[..., 0].copy(), drives=tuple(values), problems=tuple(problems))


def _value_sources(fun, args: tuple, rest) -> tuple[set[int], set[int]]:
    """Which floating leaves of `args` (flat, in order) the value of `fun(*args, rest)`'s first
    output, and of its other outputs, depend on: a walk of its jaxpr that gives each equation's
    results every source of its operands (a union over whole arrays, and over the bodies of
    calls and control flow: never a dependence missed). `rest`'s arrays (masks, signs) are
    constants."""
    leaves, treedef = jtu.tree_flatten(args)
    floating = [jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves]
    free = [jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf)) for leaf in leaves]

    def flat(*free):
        first, others = fun(*jtu.tree_unflatten(treedef, list(free)), rest)
        return first, others

    closed = jax.make_jaxpr(flat)(*free)
    sources: dict[Any, set[int]] = {
        var: ({i} if floating[i] else set()) for i, var in enumerate(closed.jaxpr.invars)
    }
    for eqn in closed.jaxpr.eqns:
        union: set[int] = set()
        for atom in eqn.invars:
            if not isinstance(atom, jcore.Literal):
                union |= sources.get(atom, set())
        for var in eqn.outvars:
            sources[var] = union
    outs = [
        set() if isinstance(v, jcore.Literal) else sources.get(v, set())
        for v in closed.jaxpr.outvars
    ]
    return outs[0], set().union(*outs[1:])


def _flat_rows(d_state, k: int, n: int) -> jax.Array:
    """The `(K, K, N)` leak from the per-leaf cotangents of `K` pulled-back rows."""
    return jnp.stack([leaf.reshape(k, n) for leaf in jtu.tree_leaves(d_state)], axis=1)
