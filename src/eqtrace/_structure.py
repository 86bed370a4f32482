"""What the diagonal rules need to know about a cell, found once on a random instance.

The unit of analysis is the *call site*: one call of a synaptic op within a step. A cell may
declare its ops in any order, call them in another, and call one op several times; each call
is paired with its op by identity (the op's position among the cell's fields), never by
order. For each call site: the shapes of its input and output and the *owner map* (which
neuron each output element reaches). For each other parameter: whether it is per-neuron
(element-wise), a small shared parameter, or does not reach the state at all. Along the way it
checks the diagonal assumptions — the state Jacobian with every op's input cut is element-wise,
every op output reaches at most one neuron, an op's weights act only through its calls — and
collects plain-words violations. The analysis only depends on the cell's static structure and
shapes, so it is cached on those; no values are cached.
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._ops import apply_op, is_op, op_input, op_params


#: Non-op parameters up to this size that are not per-neuron get a dense `(|h|, |p|)` trace.
MAX_SHARED_PARAM_SIZE = 64


class _CallLog:
    """The op calls of one run of a cell under `probed_call`, in call order.

    Call site `s` (the `s`-th op call of the step) gets `probes[s]` added to its output and,
    with recorded `outputs`, returns `outputs[s]` instead of applying its op. Each call is
    recorded with the index of the op that made it, so sites are paired with ops by identity.
    """

    def __init__(self, probes, outputs, cut: bool):
        self.probes, self.outputs, self.cut = probes, outputs, cut
        self.op_indices: list[int] = []
        self.records: list[tuple[jax.Array, jax.Array]] = []

    def call(self, index: int, op: Any, raw_input: Any) -> jax.Array:
        site = len(self.records)
        a = op_input(op, raw_input)
        if self.cut:
            a = jax.lax.stop_gradient(a)
        u = apply_op(op, a) if self.outputs is None else self.outputs[site]
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
    counter = iter(range(len(find_ops(cell))))
    return jtu.tree_map(
        lambda node: _Probed(node, next(counter), log) if is_op(node) else node,
        cell,
        is_leaf=is_op,
    )


def probed_call(cell, state, x, probes=None, *, cut: bool, outputs=None, sites=None):
    """Runs `cell(state, x)` with `probes[s]` added to the output of its `s`-th op call; with
    `outputs` (recorded by an earlier call), the calls return those instead of recomputing
    them, so only the cell's element-wise part runs. With `sites` (the op index of each call,
    from the analysis), checks that the cell made exactly those calls.

    **Returns:** `(new_state, ((a_1, u_1), …))`, each call's input vector and output.
    """
    log = _CallLog(probes, outputs, cut)
    new_state, _ = _wrap_ops(cell, log)(state, x)
    if sites is not None and tuple(log.op_indices) != tuple(sites):
        raise ValueError(
            f"{type(cell).__name__}: its synaptic ops were called in the order "
            f"{log.op_indices} (by field position), but in {list(sites)} when it was analysed. "
            "The sequence of op calls in a step must not depend on values."
        )
    return new_state, tuple(log.records)


def call_sites(cell, state, x) -> tuple[int, ...]:
    """The op index of each op call in one step of `cell`, in call order."""
    log = _CallLog(None, None, True)
    eqx.filter_eval_shape(lambda c, s, x: _wrap_ops(c, log)(s, x)[0], cell, state, x)
    return tuple(log.op_indices)


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


def _called_ops_spec(cell, called: tuple[bool, ...]):
    """A filter spec selecting the floating arrays inside the called ops of `cell`."""
    flags = iter(called)
    return jtu.tree_map(
        lambda n: jtu.tree_map(eqx.is_inexact_array, n) if is_op(n) and next(flags) else False,
        cell,
        is_leaf=is_op,
    )


@dataclasses.dataclass(frozen=True)
class CellStructure:
    cell_name: str
    state_paths: tuple[str, ...]
    neuron_shape: tuple[int, ...]
    #: Every synaptic op the cell holds (called or not), in field order.
    op_paths: tuple[str, ...]
    op_types: tuple[str, ...]
    #: Per call site (op call, in call order): the index of the op called.
    site_ops: tuple[int, ...]
    site_input_shapes: tuple[tuple[int, ...], ...]
    site_output_shapes: tuple[tuple[int, ...], ...]
    #: Per site, the flat neuron index that each flat output element reaches.
    owners: tuple[np.ndarray, ...]
    #: Per site, whether it reaches the state at all; calls used only in `output`
    #: (read-outs) get exact gradients through the output and need no trace.
    site_traced: tuple[bool, ...]
    #: Per site, the first site with the same `∂h/∂u` (itself if none): calls whose outputs
    #: are summed, as `W_in x + W_rec s`, share it, so pp-prop keeps one output trace for them.
    site_sensitivity_source: tuple[int, ...]
    param_paths: tuple[str, ...]
    #: Per non-op parameter: "elementwise" (per-neuron), "shared" (small, dense trace),
    #: "readout" (does not reach the state: exact gradient through `output`, no trace) or
    #: "unsupported".
    param_kinds: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    violations: tuple[str, ...]

    @property
    def num_leaves(self) -> int:
        return len(self.state_paths)

    @property
    def num_neurons(self) -> int:
        return math.prod(self.neuron_shape)

    @property
    def op_called(self) -> tuple[bool, ...]:
        return tuple(i in self.site_ops for i in range(len(self.op_paths)))

    def site_name(self, site: int) -> str:
        """`path` of the op of call site `site`, with the call's rank when the op is reused."""
        return _site_name(self.op_paths, self.site_ops, site)

    def site_modules(self, cell) -> list[Any]:
        """The op module of each call site of `cell` (or of a tangent shaped like it)."""
        ops = [op for _, op in find_ops(cell)]
        return [ops[i] for i in self.site_ops]

    def split_tangent(self, params_tangent) -> tuple[list[Any], list[jax.Array]]:
        """Splits a parameter tangent (a copy of the cell holding tangents in place of its
        arrays) into the tangent of each call site's op and the leaves of the non-op
        parameters, in the cell's traversal order."""
        others = eqx.filter(params_tangent, other_params_spec(params_tangent, self.op_called))
        return self.site_modules(params_tangent), jtu.tree_leaves(others)

    def other_params(self, cell) -> list[jax.Array]:
        return jtu.tree_leaves(eqx.filter(cell, other_params_spec(cell, self.op_called)))


_cache: dict[Any, CellStructure] = {}


def structure_key(*trees) -> tuple:
    """A hashable key of the static structure, shapes and dtypes of `trees` (the cache key)."""
    key = []
    for tree in trees:
        leaves, treedef = jtu.tree_flatten(tree)
        key.append(treedef)
        key.append(tuple(_leaf_key(leaf) for leaf in leaves))
    return tuple(key)


def _leaf_key(leaf) -> Any:
    """Arrays by shape and dtype; any other leaf (a Python scalar, a function held as a field)
    is part of the structure, by value (kept alive by the cache, so its id is not reused)."""
    if eqx.is_array(leaf):
        return (tuple(leaf.shape), jnp.dtype(leaf.dtype).name)
    try:
        hash(leaf)
    except TypeError:
        return (type(leaf), id(leaf))
    return leaf


def analyse(cell, state, x) -> CellStructure:
    """The structure of `cell` (cached on its static structure and the shapes involved)."""
    x = concrete(x)
    key = structure_key(cell, state, x)
    if key not in _cache:
        with jax.ensure_compile_time_eval():
            _cache[key] = _analyse(cell, state, x)
    return _cache[key]


def concrete(tree):
    """`tree` with every `jax.ShapeDtypeStruct` replaced by zeros of its shape and dtype."""
    return jtu.tree_map(
        lambda a: jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a, tree
    )


def random_like(tree, rng: np.random.Generator, scale: float):
    """`tree` with its floating arrays drawn at random (booleans true, integers zero)."""

    def draw(leaf):
        if not eqx.is_array(leaf):
            return leaf  # Python scalars and other leaves are part of the structure.
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if jnp.issubdtype(dtype, jnp.inexact):
            return jnp.asarray(rng.normal(scale=scale, size=shape), dtype)
        if jnp.issubdtype(dtype, jnp.bool_):
            return jnp.ones(shape, dtype)
        return jnp.zeros(shape, dtype)

    return jtu.tree_map(draw, tree)


def _flat(tree) -> jax.Array:
    return jnp.stack([jnp.ravel(leaf) for leaf in jtu.tree_leaves(tree)])


@eqx.filter_jit
def _jacobians(cell, state, x, sites, called, key):
    """The Jacobians the analysis inspects, for one random instance (jitted: one compile
    serves every draw)."""
    params, rest = eqx.partition(cell, other_params_spec(cell, called))
    param_leaves, param_def = jtu.tree_flatten(params)
    new_state, records = probed_call(cell, state, x, cut=False, sites=sites)
    zero_probes = [jnp.zeros_like(u) for _, u in records]

    def run(s, probes, param_leaves, cut):
        params = jtu.tree_unflatten(param_def, param_leaves)
        new_state, _ = probed_call(eqx.combine(params, rest), s, x, probes, cut=cut, sites=sites)
        return _flat(new_state)

    jac_probe, jac_full = jax.jacrev(run, argnums=(1, 2))(state, zero_probes, param_leaves, False)
    jac_state, jac_cut = jax.jacrev(run, argnums=(0, 2))(state, zero_probes, param_leaves, True)

    # With every call's output replayed, an op's weights must not change the state: if they
    # do, they act outside a call (e.g. `op.weight @ h`), which no op trace covers. One JVP
    # along a random direction tests this.
    op_arrays, others = eqx.partition(cell, _called_ops_spec(cell, called))
    outputs = [u for _, u in records]

    def replayed(op_arrays):
        cell = eqx.combine(op_arrays, others)
        return _flat(probed_call(cell, state, x, cut=False, outputs=outputs, sites=sites)[0])

    direction = jtu.tree_map(lambda a: jax.random.normal(key, a.shape, a.dtype), op_arrays)
    _, outside_calls = jax.jvp(replayed, (op_arrays,), (direction,))

    # Which state leaves the output reads: the online gradient enters the traces there.
    def output(s):
        leaves = jtu.tree_leaves(eqx.filter(cell.output(s), eqx.is_inexact_array))
        return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]) if leaves else jnp.zeros(0)

    jac_output = jax.jacrev(output)(state)
    return jac_probe, jac_state, jac_cut, jac_full, outside_calls, jac_output


def output_mismatch(model, state, x) -> bool:
    """Whether the `y` that `model(state, x)` returns differs from `model.output(new_state)`
    on random instances (cached like `analyse`)."""
    x = concrete(x)
    key = ("output", *structure_key(model, state, x))
    if key not in _cache:
        with jax.ensure_compile_time_eval():
            rng = np.random.default_rng(1)
            mismatch = False
            for scale in (0.5, 2.0):
                draws = [random_like(tree, rng, scale) for tree in (model, state, x)]
                mismatch |= not _outputs_agree(*draws)
            _cache[key] = mismatch
    return _cache[key]


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


def _analyse(cell, state, x) -> CellStructure:
    name = type(cell).__name__
    violations: list[str] = []
    state_leaves_with_paths = jtu.tree_leaves_with_path(state)
    state_paths = tuple(f"state{jtu.keystr(p)}" for p, _ in state_leaves_with_paths)
    shapes = {tuple(jnp.shape(leaf)) for _, leaf in state_leaves_with_paths}
    if len(shapes) != 1:
        raise ValueError(
            f"{name}: the diagonal rules need every state leaf of a cell to have one neuron shape "
            f"(a K-by-K block per neuron), but the leaves {list(state_paths)} have shapes "
            f"{[tuple(jnp.shape(s)) for _, s in state_leaves_with_paths]}. Give all leaves the "
            "same shape, or use `eqtrace.RTRL()` for this cell."
        )
    (neuron_shape,) = shapes
    num_leaves, num_neurons = len(state_paths), math.prod(neuron_shape)

    ops = find_ops(cell)
    op_paths = tuple(path for path, _ in ops)
    sites = call_sites(cell, state, x)
    called = tuple(i in sites for i in range(len(ops)))
    params_with_paths = jtu.tree_leaves_with_path(eqx.filter(cell, other_params_spec(cell, called)))
    param_paths = tuple(jtu.keystr(p) for p, _ in params_with_paths)
    param_shapes = tuple(tuple(jnp.shape(leaf)) for _, leaf in params_with_paths)

    # One eager run on a random instance: the records of calls made inside a JAX transformation
    # within the cell (`jax.vmap(self.op)`) come out as that transformation's tracers.
    rng = np.random.default_rng(0)
    draws = [random_like(tree, rng, 1.0) for tree in (cell, state, x)]
    _, records = probed_call(*draws, cut=True, sites=sites)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jtu.tree_leaves(records)):
        raise ValueError(
            f"{name}: a synaptic op is called inside a JAX transformation within the cell "
            "(e.g. `jax.vmap(self.op)(xs)` or a `lax.scan`), so its calls cannot be traced one "
            "by one. Call each op directly on its input (a convolution such as `eqx.nn.Conv1d` "
            "with kernel size 1 applies one weight matrix at many positions), or use "
            "`eqtrace.RTRL()` for this cell."
        )
    in_shapes = tuple(tuple(a.shape) for a, _ in records)
    out_shapes = tuple(tuple(u.shape) for _, u in records)
    num_sites = len(sites)

    owner_hits = [np.zeros((num_neurons, math.prod(s)), bool) for s in out_shapes]
    same_sensitivity = np.array([[a == b for b in out_shapes] for a in out_shapes], bool).reshape(
        num_sites, num_sites
    )
    cut_offdiag = np.zeros((num_leaves, num_leaves), bool)
    param_offdiag = [False] * len(param_paths)
    param_feeds_op = [False] * len(param_paths)
    param_reaches_state = [False] * len(param_paths)
    op_used_outside = np.zeros(len(ops), bool)
    leaf_read = np.zeros(num_leaves, bool)  # read by `output`
    leaf_link = np.zeros((num_leaves, num_leaves), bool)  # `h^m_{t-1}` reaches `h^k_t` (cut)
    site_leaves = np.zeros((num_sites, num_leaves), bool)  # leaves each call reaches
    param_leaves = np.zeros((len(param_paths), num_leaves), bool)
    for draw, scale in enumerate((0.3, 1.0, 3.0)):
        c = random_like(cell, rng, scale)
        s = random_like(state, rng, scale)
        xr = random_like(x, rng, scale)
        jac_probe, jac_state, jac_cut, jac_full, outside, jac_output = _jacobians(
            c, s, xr, sites, called, jax.random.key(draw)
        )
        for m, block in enumerate(jtu.tree_leaves(jac_output)):
            leaf_read[m] |= bool(np.any(np.asarray(block) != 0))
        for m, block in enumerate(jtu.tree_leaves(jac_state)):
            leaf_link[:, m] |= np.any(np.asarray(block).reshape(num_leaves, -1) != 0, axis=1)
        for i, jac in enumerate(jac_probe):
            site_leaves[i] |= np.any(np.asarray(jac).reshape(num_leaves, -1) != 0, axis=1)
        for i, jac in enumerate(jac_cut):
            param_leaves[i] |= np.any(np.asarray(jac).reshape(num_leaves, -1) != 0, axis=1)
        # ∂h/∂u for every call: which neurons each output element reaches.
        for i, jac in enumerate(jac_probe):
            hits = np.any(np.asarray(jac).reshape(num_leaves, num_neurons, -1) != 0, axis=0)
            owner_hits[i] |= hits
        for i, jac_i in enumerate(jac_probe):
            for j, jac_j in enumerate(jac_probe):
                if same_sensitivity[i, j]:
                    same_sensitivity[i, j] = np.array_equal(jac_i, jac_j)
        # The state Jacobian with op inputs cut must be element-wise within each leaf pair.
        for m, block in enumerate(jtu.tree_leaves(jac_state)):
            block = np.asarray(block).reshape(num_leaves, num_neurons, num_neurons)
            cut_offdiag[:, m] |= np.any(block * (1 - np.eye(num_neurons)) != 0, axis=(1, 2))
        # Parameters outside ops: per-neuron (diagonal) or small shared; none may feed an op.
        for i, (jc, jf) in enumerate(zip(jac_cut, jac_full)):
            jc, jf = np.asarray(jc), np.asarray(jf)
            param_feeds_op[i] |= not np.allclose(jc, jf)
            param_reaches_state[i] |= bool(np.any(jf != 0))
            if param_shapes[i] == neuron_shape:
                block = jc.reshape(num_leaves, num_neurons, num_neurons)
                param_offdiag[i] |= bool(np.any(block * (1 - np.eye(num_neurons)) != 0))
        if np.any(np.asarray(outside) != 0):
            # Which op: the same test one op at a time (rare, so not worth a faster path).
            for i in np.flatnonzero(called):
                op_used_outside[i] |= _used_outside_calls(c, s, xr, sites, int(i))

    owners = []
    for site, hits in enumerate(owner_hits):
        counts = hits.sum(axis=0)
        for j in np.flatnonzero(counts > 1)[:1]:
            violations.append(
                f"output element {j} of the op `{_site_name(op_paths, sites, site)}` reaches "
                f"{counts[j]} neurons ({list(np.flatnonzero(hits[:, j]))[:4]}…); each op output "
                "must reach one neuron through element-wise operations (mixing after the op is "
                "not diagonal)."
            )
        owners.append(np.argmax(hits, axis=0).astype(np.int32))
    for k in range(num_leaves):
        for m in range(num_leaves):
            if cut_offdiag[k, m]:
                violations.append(
                    f"`{state_paths[k]}` depends on other neurons' `{state_paths[m]}` outside a "
                    "synaptic op (e.g. jnp.roll, a reduction, or a matmul that is not a "
                    "recognised op), so the state Jacobian is not element-wise."
                )
    for i in np.flatnonzero(op_used_outside):
        violations.append(
            f"the weights of the op `{op_paths[i]}` change the state other than through calls "
            "of the op (e.g. `op.weight @ h`); the op traces only cover its calls. Call the op, "
            "or hold such weights as a separate parameter."
        )
    # The online gradient reaches a trace through the leaves `output` reads, and through the
    # leaves that reach those over time by the cut Jacobian. A call or parameter acting only on
    # other leaves (which reach the output only through an op's input, a path the rules cut)
    # would get an exactly zero gradient.
    reached = leaf_read.copy()
    for _ in range(num_leaves):
        reached |= np.any(leaf_link & reached[:, None], axis=0)
    unreached = [state_paths[k] for k in np.flatnonzero(~reached)]
    why = (
        "which reach the cell's output only through the input of a synaptic op (a path the "
        "diagonal rules cut), so it would get a zero gradient. Make `output` read those "
        "leaves, or use `eqtrace.RTRL()`."
    )
    for site in range(num_sites):
        if site_leaves[site].any() and not (site_leaves[site] & reached).any():
            violations.append(
                f"the op `{_site_name(op_paths, sites, site)}` acts only on the state leaves "
                f"{unreached}, {why}"
            )
    for i, path in enumerate(param_paths):
        if param_leaves[i].any() and not (param_leaves[i] & reached).any():
            violations.append(
                f"the parameter `{path}` acts only on the state leaves {unreached}, {why}"
            )
    kinds = []
    for i, path in enumerate(param_paths):
        size = math.prod(param_shapes[i])
        if param_feeds_op[i]:
            violations.append(
                f"the parameter `{path}` acts on the input of a synaptic op; the diagonal rules "
                "cut op inputs and would miss that path."
            )
        if not param_reaches_state[i]:
            kinds.append("readout")
        elif param_shapes[i] == neuron_shape and not param_offdiag[i]:
            kinds.append("elementwise")
        elif size <= MAX_SHARED_PARAM_SIZE:
            kinds.append("shared")
        else:
            kinds.append("unsupported")
            violations.append(
                f"the parameter `{path}` (shape {param_shapes[i]}) is neither per-neuron "
                f"(shape {neuron_shape}, acting element-wise) nor a small shared parameter "
                f"(at most {MAX_SHARED_PARAM_SIZE} values) nor inside a called synaptic op, "
                "so no diagonal trace covers it."
            )
    if output_mismatch(cell, state, x):
        violations.append(
            "the `y` returned by `__call__` differs from `output(new_state)`; online rules need "
            "the output to be a function of the new state, given by `output`."
        )
    return CellStructure(
        cell_name=name,
        state_paths=state_paths,
        neuron_shape=neuron_shape,
        op_paths=op_paths,
        op_types=tuple(type(op).__name__ for _, op in ops),
        site_ops=sites,
        site_input_shapes=in_shapes,
        site_output_shapes=out_shapes,
        owners=tuple(owners),
        site_traced=tuple(bool(hits.any()) for hits in owner_hits),
        site_sensitivity_source=tuple(int(np.argmax(row)) for row in same_sensitivity),
        param_paths=param_paths,
        param_kinds=tuple(kinds),
        param_shapes=param_shapes,
        violations=tuple(violations),
    )


def _site_name(op_paths, sites, site) -> str:
    """See `CellStructure.site_name`."""
    uses = [s for s, o in enumerate(sites) if o == sites[site]]
    path = op_paths[sites[site]]
    return path if len(uses) == 1 else f"{path} (call {uses.index(site) + 1} of {len(uses)})"


@eqx.filter_jit
def _outside_jvp(cell, state, x, sites, index):
    """`_jacobians`' replay test for op `index` alone."""
    op = find_ops(cell)[index][1]
    arrays = op_params(op)
    _, records = probed_call(cell, state, x, cut=False, sites=sites)
    outputs = [u for _, u in records]

    def replayed(arrays):
        new_op = eqx.combine(arrays, op)
        new_cell = eqx.tree_at(lambda c: find_ops(c)[index][1], cell, new_op)
        return _flat(probed_call(new_cell, state, x, cut=False, outputs=outputs, sites=sites)[0])

    direction = jtu.tree_map(jnp.ones_like, arrays)
    return jax.jvp(replayed, (arrays,), (direction,))[1]


def _used_outside_calls(cell, state, x, sites, index) -> bool:
    return bool(np.any(np.asarray(_outside_jvp(cell, state, x, sites, index)) != 0))
