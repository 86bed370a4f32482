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
shapes, so it is cached on those (least recently used first out); no values are cached. The
cell is run with its ops observed by `_probing.probed_call`.
"""

import collections
import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._ops import algebra, op_params
from ._probing import (
    call_sites,
    called_ops_spec,
    concrete,
    find_ops,
    other_params_spec,
    probed_call,
    random_like,
)


#: Non-op parameters up to this size that are not per-neuron get a dense `(|h|, |p|)` trace.
MAX_SHARED_PARAM_SIZE = 64


@dataclasses.dataclass(frozen=True)
class CallSite:
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
    #: Whether every weight of the op reaches a single output element (dense, embedding),
    #: so that D-RTRL's weight-shaped trace is defined; not for a convolution or `U @ V`.
    weights_reach_one_output: bool


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
    #: "elementwise" (per-neuron), "shared" (small, dense trace), "readout" (does not reach
    #: the state: exact gradient through `output`, no trace) or "unsupported".
    kind: str


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
    violations: tuple[str, ...]

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


#: Analyses kept at most. The key holds static field values (e.g. every `tau_mem` used), so
#: an unbounded cache would grow with every hyperparameter tried in one process.
CACHE_SIZE = 256
_cache: collections.OrderedDict[Any, Any] = collections.OrderedDict()


def _cached(key, compute):
    """`compute()`, remembered under `key` in a least-recently-used cache of `CACHE_SIZE`."""
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    with jax.ensure_compile_time_eval():
        value = compute()
    _cache[key] = value
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return value


def structure_key(*trees) -> tuple:
    """A hashable key of the static structure, shapes and dtypes of `trees` (the cache key)."""
    key = []
    for tree in trees:
        leaves, treedef = jtu.tree_flatten(tree)
        key.append(treedef)
        key.append(tuple(_leaf_key(leaf) for leaf in leaves))
    return tuple(key)


class _Identity:
    """An unhashable leaf in a cache key: equal only to itself, and kept alive by the key, so
    that its `id` cannot be reused by another object while the key exists."""

    def __init__(self, leaf):
        self.leaf = leaf

    def __hash__(self):
        return id(self.leaf)

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.leaf is self.leaf


def _leaf_key(leaf) -> Any:
    """Arrays by shape and dtype; any other leaf (a Python scalar, a function held as a field)
    is part of the structure, by value (by identity if it cannot be hashed)."""
    if eqx.is_array(leaf):
        return (tuple(leaf.shape), jnp.dtype(leaf.dtype).name)
    try:
        hash(leaf)
    except TypeError:
        return _Identity(leaf)
    return leaf


#: Random instances the analysis always draws, at these scales (then cycled for more draws).
DRAW_SCALES = (0.3, 1.0, 3.0)
#: More draws stop when this many in a row resolve nothing more, or at `MAX_DRAWS` in all.
PATIENCE, MAX_DRAWS = 16, 64
#: Draws times neurons analysed at least (more draws for cells of few neurons).
MIN_NEURON_DRAWS = 16


def _draws(unresolved):
    """`(index, scale)` of the random instances to analyse: `DRAW_SCALES`, then more while
    `unresolved(draws)` (a count of elements whose dependence has not shown yet, after
    `draws` draws) is not zero and keeps falling. A derivative that vanishes on part of the
    inputs (a ReLU, `jnp.minimum`, `jnp.where`) hides a dependence on about half the draws,
    so three draws miss some of the many elements of an array; more draws find them.
    Elements with no dependence at all (an input `x`) stop the draws after `PATIENCE` more."""
    draw, fewest, stalled = 0, None, 0
    while True:
        if draw >= len(DRAW_SCALES):
            left = unresolved(draw)
            if left == 0 or draw >= MAX_DRAWS:
                return
            stalled = stalled + 1 if fewest is not None and left >= fewest else 0
            fewest = left if fewest is None else min(fewest, left)
            if stalled >= PATIENCE:
                return
        yield draw, DRAW_SCALES[draw % len(DRAW_SCALES)]
        draw += 1


def _unowned_outputs(owner_hits) -> int:
    """How many output elements of the calls that reach the state have reached no neuron
    yet (their owner would default to neuron 0)."""
    return sum(int(np.sum(~hits.any(axis=0))) for hits in owner_hits if hits.any())


def analyse(cell, state, x) -> CellStructure:
    """The structure of `cell` (cached on its static structure and the shapes involved)."""
    x = concrete(x)
    return _cached(structure_key(cell, state, x), lambda: _analyse(cell, state, x))


def _flat(tree) -> jax.Array:
    return jnp.stack([jnp.ravel(leaf) for leaf in jtu.tree_leaves(tree)])


def _finite(tree):
    """`tree` with its non-finite entries set to zero. A random draw can overflow where the
    cell divides by or exponentiates a parameter (`exp(-dt / τ)` at a `τ` near zero); an
    infinite derivative then spreads NaNs (`0 · inf`) over entries that do not depend on each
    other, which would read as dependences. Such an entry tells nothing in that draw; the
    other draws show the dependence."""
    return jtu.tree_map(lambda a: jnp.where(jnp.isfinite(a), a, 0), tree)


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
    jac_state, jac_probe_cut, jac_cut = jax.jacrev(run, argnums=(0, 1, 2))(
        state, zero_probes, param_leaves, True
    )

    # With every call's output replayed, an op's weights must not change the state: if they
    # do, they act outside a call (e.g. `op.weight @ h`), which no op trace covers. One JVP
    # along a random direction tests this.
    op_arrays, others = eqx.partition(cell, called_ops_spec(cell, called))
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
    return _finite(
        (jac_probe, jac_state, jac_cut, jac_full, outside_calls, jac_output, jac_probe_cut)
    )


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
    on random instances (cached like `analyse`)."""
    x = concrete(x)

    def compute():
        rng = np.random.default_rng(1)
        mismatch = False
        for scale in (0.5, 2.0):
            draws = [random_like(tree, rng, scale) for tree in (model, state, x)]
            mismatch |= not _outputs_agree(*draws)
        return mismatch

    return _cached(("output", *structure_key(model, state, x)), compute)


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
        raise ValueError(
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
        raise ValueError(
            f"{name}: the diagonal rules need real state leaves, but these are complex: "
            + ", ".join(complex_)
            + ". Hold each complex leaf as two real leaves, its real and imaginary "
            "parts (as `eqtrace.nn.LRUCell` does), or use `eqtrace.RTRL()` or `eqtrace.UORO()` "
            "for this cell."
        )


def _analyse(cell, state, x) -> CellStructure:
    name = type(cell).__name__
    violations: list[str] = []
    state_leaves_with_paths = jtu.tree_leaves_with_path(state)
    state_paths = tuple(f"state{jtu.keystr(p)}" for p, _ in state_leaves_with_paths)
    _require_real_leaves(name, state_paths, [leaf for _, leaf in state_leaves_with_paths])
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
    sites, nested = call_sites(cell, state, x)
    if nested:
        raise ValueError(
            f"{name}: a synaptic op is called inside a JAX transformation within the cell ("
            + ", ".join(f"`{op_paths[i]}`" for i in nested)
            + ", e.g. in `jax.vmap(self.op)(xs)`, a `lax.cond` branch or a `lax.scan`), so its "
            "calls cannot be traced one by one. Call each op directly on its input (select "
            "between results with `jnp.where`; a convolution such as `eqx.nn.Conv1d` with "
            "kernel size 1 applies one weight matrix at many positions), or use "
            "`eqtrace.RTRL()` for this cell."
        )
    called = tuple(i in sites for i in range(len(ops)))
    params_with_paths = jtu.tree_leaves_with_path(eqx.filter(cell, other_params_spec(cell, called)))
    param_paths = tuple(jtu.keystr(p) for p, _ in params_with_paths)
    param_shapes = tuple(tuple(jnp.shape(leaf)) for _, leaf in params_with_paths)

    rng = np.random.default_rng(0)
    draws = [random_like(tree, rng, 1.0) for tree in (cell, state, x)]
    _, records = probed_call(*draws, cut=True, sites=sites)
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
    site_reaches_cut = np.zeros(num_sites, bool)  # with every op's input cut

    def unresolved(draws):
        # A dependence that a gate (a ReLU) hides on about half the draws hides on every
        # neuron of a draw often when there are few neurons: then calls seem to share their
        # `∂h/∂u`, or a leaf seems unread. Small cells get more draws, until such a chance
        # is below 2^-16.
        return _unowned_outputs(owner_hits) + (draws * num_neurons < MIN_NEURON_DRAWS)

    for draw, scale in _draws(unresolved):
        c = random_like(cell, rng, scale)
        s = random_like(state, rng, scale)
        xr = random_like(x, rng, scale)
        jac_probe, jac_state, jac_cut, jac_full, outside, jac_output, jac_probe_cut = _jacobians(
            c, s, xr, sites, called, jax.random.key(draw)
        )
        for i, jac in enumerate(jac_probe_cut):
            site_reaches_cut[i] |= bool(np.any(np.asarray(jac) != 0))
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
            if not site_reaches_cut[site]:
                violations.append(
                    f"the op `{_site_name(op_paths, sites, site)}` reaches the state only through "
                    f"the input of another op (output element {j} reaches {counts[j]} neurons "
                    "that way); the diagonal rules cut op inputs, so its weights would get no "
                    "gradient. A layer that transforms the input (an `eqx.nn.MLP` on `x`) "
                    "belongs before the cell, in `eqtrace.nn.Sequential`, where its gradient is "
                    "exact; ops chained after an op (an `eqx.nn.MLP` on its output) mix neurons, "
                    "which only `eqtrace.RTRL()` traces."
                )
                continue
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
    ops_reaching_one_output = [
        _weights_reach_one_output(op, a, jax.random.key(site))
        for site, (op, (a, _)) in enumerate(zip(_site_modules(draws[0], sites), records))
    ]
    return CellStructure(
        cell_name=name,
        state_paths=state_paths,
        neuron_shape=neuron_shape,
        ops=tuple(
            HeldOp(path=path, type_name=type(op).__name__, called=is_called)
            for (path, op), is_called in zip(ops, called)
        ),
        sites=tuple(
            CallSite(
                op=sites[site],
                name=_site_name(op_paths, sites, site),
                input_shape=in_shapes[site],
                output_shape=out_shapes[site],
                owners=owners[site],
                traced=bool(owner_hits[site].any()),
                sensitivity_source=int(np.argmax(same_sensitivity[site])),
                weights_reach_one_output=ops_reaching_one_output[site],
            )
            for site in range(num_sites)
        ),
        params=tuple(
            OtherParam(path=path, shape=shape, kind=kind)
            for path, shape, kind in zip(param_paths, param_shapes, kinds)
        ),
        violations=tuple(violations),
    )


def _site_modules(cell, sites) -> list[Any]:
    """The op module of each call site (`sites`: the op index of each call)."""
    ops = [op for _, op in find_ops(cell)]
    return [ops[i] for i in sites]


def _weights_reach_one_output(op, a, key) -> bool:
    """Whether every weight of `op` reaches a single output element, tested on the identity
    that then holds for any per-output `v` and weight tangent `δ`: spreading `v` over the
    weights and applying the op's tangent map equals scaling its output tangent by `v`.
    Computed in one dtype, at least float32, so that the tolerance means the same in every
    dtype and an input wider than the weights (a float64 layer feeding a float32 cell) gives
    tangents of the weights' dtype."""
    floats = [leaf.dtype for leaf in jtu.tree_leaves((op, a)) if eqx.is_inexact_array(leaf)]
    dtype = jnp.result_type(jnp.float32, *floats)

    def widen(leaf):
        return leaf.astype(dtype) if eqx.is_inexact_array(leaf) else leaf

    # Any input vector serves; an overflow of the random draw (`exp(-1/τ)` at a small `τ`)
    # is replaced.
    a = jnp.where(jnp.isfinite(a), a, 1)
    spread, scaled = _spread_identity(jtu.tree_map(widen, op), widen(a), key)
    spread, scaled = np.asarray(spread), np.asarray(scaled)
    return bool(
        np.max(np.abs(spread - scaled), initial=0) <= 1e-4 * np.max(np.abs(scaled), initial=1e-30)
    )


@eqx.filter_jit
def _spread_identity(op, a, key):
    rules = algebra(op)
    params, static = eqx.partition(op, eqx.is_inexact_array)

    def tangent_map(tangent):
        return jax.jvp(lambda p: rules.apply(eqx.combine(p, static), a), (params,), (tangent,))[1]

    v_key, delta_key = jax.random.split(key)
    u = rules.apply(op, a)
    v = jax.random.normal(v_key, u.shape, u.dtype)
    delta = jtu.tree_map(lambda p: jax.random.normal(delta_key, p.shape, p.dtype), params)
    spread = rules.spread(op, a, v)
    weighted = jtu.tree_map(lambda s, d: jnp.broadcast_to(s, d.shape) * d, spread, delta)
    return tangent_map(weighted), v * tangent_map(delta)


def _site_name(op_paths, sites, site) -> str:
    """The op's path, with the call's rank when the op is called more than once."""
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
    return _finite(jax.jvp(replayed, (arrays,), (direction,))[1])


def _used_outside_calls(cell, state, x, sites, index) -> bool:
    return bool(np.any(np.asarray(_outside_jvp(cell, state, x, sites, index)) != 0))


@dataclasses.dataclass(frozen=True)
class InputOwners:
    """Which neuron's state each input element of each call site depends on (what SnAp-1's
    self-paths go through), found on random instances like the output owners."""

    #: Per call site, the flat neuron index of each flat input element: `-1` if it depends on
    #: no neuron's state (an input `x`) or on several.
    owners: tuple[np.ndarray, ...]
    #: Per call site, how many input elements depend on several neurons' states.
    shared: tuple[int, ...]


def input_owners(cell, state, x, structure: CellStructure) -> InputOwners:
    """The input owners of `cell`'s call sites (cached like `analyse`). An input element
    depends on a neuron through the previous state directly, or through the output of an
    earlier call (owned by that neuron), not through the op inputs before those calls."""
    x = concrete(x)
    return _cached(
        ("input_owners", *structure_key(cell, state, x)),
        lambda: _input_owners(cell, state, x, structure),
    )


@eqx.filter_jit
def _input_jacobians(cell, state, x, sites):
    """Per call site, `∂a/∂h_{t-1}` and `∂a/∂u` for every call's output `u` (replayed, so
    that an output does not depend on its op's input)."""
    _, records = probed_call(cell, state, x, cut=False, sites=sites)
    outputs = [u for _, u in records]

    def inputs(s, probes):
        _, records = probed_call(cell, s, x, probes, cut=False, outputs=outputs, sites=sites)
        return [a for a, _ in records]

    return _finite(jax.jacrev(inputs, argnums=(0, 1))(state, [jnp.zeros_like(u) for u in outputs]))


def _input_owners(cell, state, x, structure: CellStructure) -> InputOwners:
    if not structure.sites:  # No op calls (parameters outside ops only): nothing to own.
        return InputOwners(owners=(), shared=())
    n = structure.num_neurons
    hits = [np.zeros((math.prod(site.input_shape), n), bool) for site in structure.sites]
    rng = np.random.default_rng(2)

    def unowned_inputs(draws):  # Of the calls whose input depends on the state at all.
        del draws
        return sum(int(np.sum(~h.any(axis=1))) for h in hits if h.any())

    for _, scale in _draws(unowned_inputs):
        draws = [random_like(tree, rng, scale) for tree in (cell, state, x)]
        for i, (d_state, d_probes) in enumerate(_input_jacobians(*draws, structure.site_ops)):
            size = hits[i].shape[0]
            for block in jtu.tree_leaves(d_state):
                hits[i] |= np.asarray(block).reshape(size, n) != 0
            for site, block in zip(structure.sites, d_probes):
                if site.traced:
                    rows, cols = np.nonzero(np.asarray(block).reshape(size, -1))
                    hits[i][rows, site.owners[cols]] = True
    counts = [h.sum(axis=1) for h in hits]
    return InputOwners(
        owners=tuple(
            np.where(c == 1, np.argmax(h, axis=1), -1).astype(np.int32)
            for h, c in zip(hits, counts)
        ),
        shared=tuple(int(np.sum(c > 1)) for c in counts),
    )
