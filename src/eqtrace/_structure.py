"""What the diagonal rules need to know about a cell, found once on a random instance.

For each synaptic op: the shapes of its input and output and the *owner map* (which neuron each
output element reaches). For each other parameter: whether it is per-neuron (element-wise) or a
small shared parameter. Along the way it checks the diagonal assumptions — the state Jacobian
with every op's input cut is element-wise, and every op output reaches at most one neuron — and
collects plain-words violations. The analysis only depends on the cell's static structure and
shapes, so it is cached on those; no values are cached.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._ops import apply_op, is_op, op_input


#: Non-op parameters up to this size that are not per-neuron get a dense `(|h|, |p|)` trace.
MAX_SHARED_PARAM_SIZE = 64


class _Probed(eqx.Module):
    """An op whose output gets `probe` added, whose input gradient may be cut, and whose input
    and output are reported to `record` (used within one traced function, returned through
    `has_aux`). Given a recorded `output`, it returns that instead of applying the op."""

    op: Any
    probe: jax.Array | None
    output: jax.Array | None
    record: Callable = eqx.field(static=True)
    cut: bool = eqx.field(static=True)

    def __call__(self, raw_input, *, key=None):
        del key
        a = op_input(self.op, raw_input)
        if self.cut:
            a = jax.lax.stop_gradient(a)
        u = apply_op(self.op, a) if self.output is None else self.output
        self.record((a, u))
        return u if self.probe is None else u + self.probe


def probed_call(cell, state, x, probes, *, cut: bool, outputs=None):
    """Runs `cell(state, x)` with `probes[i]` added to the output of its i-th op; with
    `outputs` (recorded by an earlier call), the ops return those instead of recomputing
    them, so only the cell's element-wise part runs.

    **Returns:** `(new_state, ((a_1, u_1), …))`, each op's input vector and output.
    """
    records = []
    probe_iter = iter(probes)
    output_iter = iter([None] * len(probes) if outputs is None else outputs)

    def wrap(node):
        if not is_op(node):
            return node
        return _Probed(node, next(probe_iter), next(output_iter), records.append, cut)

    new_state, _ = jtu.tree_map(wrap, cell, is_leaf=is_op)(state, x)
    return new_state, tuple(records)


def find_ops(cell) -> list[tuple[str, Any]]:
    """The synaptic ops held by `cell`, with their attribute paths, in traversal order."""
    leaves = jtu.tree_leaves_with_path(cell, is_leaf=is_op)
    return [(jtu.keystr(path), node) for path, node in leaves if is_op(node)]


def other_params_spec(cell):
    """A filter spec selecting the floating arrays of `cell` that are not inside an op."""
    return jtu.tree_map(
        lambda n: False if is_op(n) else eqx.is_inexact_array(n), cell, is_leaf=is_op
    )


@dataclasses.dataclass(frozen=True)
class CellStructure:
    cell_name: str
    state_paths: tuple[str, ...]
    neuron_shape: tuple[int, ...]
    op_paths: tuple[str, ...]
    op_types: tuple[str, ...]
    op_input_shapes: tuple[tuple[int, ...], ...]
    op_output_shapes: tuple[tuple[int, ...], ...]
    #: Per op, the flat neuron index that each flat output element reaches.
    owners: tuple[np.ndarray, ...]
    #: Per op, whether it reaches the state at all; ops used only in `output` (read-outs)
    #: get exact gradients through the output and need no trace.
    op_traced: tuple[bool, ...]
    #: Per op, the first op with the same `∂h/∂u` (itself if none): ops whose outputs are
    #: summed, as `W_in x + W_rec s`, share it, so pp-prop keeps one output trace for them.
    op_sensitivity_source: tuple[int, ...]
    param_paths: tuple[str, ...]
    #: Per non-op parameter: "elementwise" (per-neuron) or "shared" (small, dense trace).
    param_kinds: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    violations: tuple[str, ...]

    @property
    def num_leaves(self) -> int:
        return len(self.state_paths)

    @property
    def num_neurons(self) -> int:
        return math.prod(self.neuron_shape)


_cache: dict[Any, CellStructure] = {}


def _aval(x) -> tuple:
    return (tuple(jnp.shape(x)), jnp.result_type(x).name)


def analyse(cell, state, x) -> CellStructure:
    """The structure of `cell` (cached on its static structure and the shapes involved)."""
    key = (
        jtu.tree_structure(cell),
        tuple(_aval(leaf) for leaf in jtu.tree_leaves(cell)),
        jtu.tree_structure(state),
        tuple(_aval(leaf) for leaf in jtu.tree_leaves(state)),
        jtu.tree_structure(x),
        tuple(_aval(leaf) for leaf in jtu.tree_leaves(x)),
    )
    if key not in _cache:
        with jax.ensure_compile_time_eval():
            _cache[key] = _analyse(cell, state, x)
    return _cache[key]


def _random_like(tree, rng: np.random.Generator, scale: float):
    def draw(leaf):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            return leaf  # Python scalars and non-array leaves are part of the structure.
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if jnp.issubdtype(dtype, jnp.inexact):
            return jnp.asarray(rng.normal(scale=scale, size=shape), dtype)
        if jnp.issubdtype(dtype, jnp.bool_):
            return jnp.ones(shape, dtype)
        return jnp.zeros(shape, dtype)

    return jtu.tree_map(draw, tree)


@eqx.filter_jit
def _jacobians(cell, state, x, spec):
    """The Jacobians the analysis inspects, for one random instance (jitted: one compile
    serves every draw)."""
    params, rest = eqx.partition(cell, spec)
    param_leaves, param_def = jtu.tree_flatten(params)
    _, records = jax.eval_shape(
        lambda: probed_call(cell, state, x, [None] * len(find_ops(cell)), cut=True)
    )
    zero_probes = [jnp.zeros(u.shape, u.dtype) for _, u in records]

    def run(s, probes, param_leaves, cut):
        params = jtu.tree_unflatten(param_def, param_leaves)
        new_state, _ = probed_call(eqx.combine(params, rest), s, x, probes, cut=cut)
        return jnp.stack([jnp.ravel(leaf) for leaf in jtu.tree_leaves(new_state)])

    jac_probe, jac_full = jax.jacrev(run, argnums=(1, 2))(state, zero_probes, param_leaves, False)
    jac_state, jac_cut = jax.jacrev(run, argnums=(0, 2))(state, zero_probes, param_leaves, True)
    new_state, y = cell(state, x)
    outputs = (jtu.tree_leaves(y), jtu.tree_leaves(cell.output(new_state)))
    return jac_probe, jac_state, jac_cut, jac_full, outputs


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
    spec = other_params_spec(cell)
    params_with_paths = jtu.tree_leaves_with_path(eqx.filter(cell, spec))
    param_paths = tuple(jtu.keystr(p) for p, _ in params_with_paths)
    param_shapes = tuple(tuple(jnp.shape(leaf)) for _, leaf in params_with_paths)

    _, records = jax.eval_shape(
        lambda c, s, x: probed_call(c, s, x, [None] * len(ops), cut=True), cell, state, x
    )
    if len(records) != len(ops):
        raise ValueError(
            f"{name}: its synaptic ops {list(op_paths)} were called {len(records)} times in one "
            "step, but the diagonal rules need each op called exactly once per step. Use a "
            "separate op for each use, or `eqtrace.RTRL()`."
        )
    in_shapes = tuple(tuple(a.shape) for a, _ in records)
    out_shapes = tuple(tuple(u.shape) for _, u in records)

    owner_hits = [np.zeros((num_neurons, math.prod(s)), bool) for s in out_shapes]
    same_sensitivity = np.array([[a == b for b in out_shapes] for a in out_shapes], bool).reshape(
        len(ops), len(ops)
    )
    cut_offdiag = np.zeros((num_leaves, num_leaves), bool)
    param_offdiag = [False] * len(param_paths)
    param_feeds_op = [False] * len(param_paths)
    output_mismatch = False
    rng = np.random.default_rng(0)
    for scale in (0.3, 1.0, 3.0):
        c = _random_like(cell, rng, scale)
        s = _random_like(state, rng, scale)
        xr = _random_like(x, rng, scale)
        jac_probe, jac_state, jac_cut, jac_full, outputs = _jacobians(c, s, xr, spec)
        # ∂h/∂u for every op: which neurons each output element reaches.
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
            if param_shapes[i] == neuron_shape:
                block = jc.reshape(num_leaves, num_neurons, num_neurons)
                param_offdiag[i] |= bool(np.any(block * (1 - np.eye(num_neurons)) != 0))
        output_mismatch |= not all(np.allclose(a, b) for a, b in zip(*outputs))

    owners = []
    for path, hits in zip(op_paths, owner_hits):
        counts = hits.sum(axis=0)
        for j in np.flatnonzero(counts > 1)[:1]:
            violations.append(
                f"output element {j} of the op `{path}` reaches {counts[j]} neurons "
                f"({list(np.flatnonzero(hits[:, j]))[:4]}…); each op output must reach one neuron "
                "through element-wise operations (mixing after the op is not diagonal)."
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
    kinds = []
    for i, path in enumerate(param_paths):
        size = math.prod(param_shapes[i])
        if param_feeds_op[i]:
            violations.append(
                f"the parameter `{path}` acts on the input of a synaptic op; the diagonal rules "
                "cut op inputs and would miss that path."
            )
        if param_shapes[i] == neuron_shape and not param_offdiag[i]:
            kinds.append("elementwise")
        elif size <= MAX_SHARED_PARAM_SIZE:
            kinds.append("shared")
        else:
            kinds.append("unsupported")
            violations.append(
                f"the parameter `{path}` (shape {param_shapes[i]}) is neither per-neuron "
                f"(shape {neuron_shape}, acting element-wise) nor a small shared parameter "
                f"(at most {MAX_SHARED_PARAM_SIZE} values) nor inside a recognised synaptic op, "
                "so no diagonal trace covers it."
            )
    if output_mismatch:
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
        op_input_shapes=in_shapes,
        op_output_shapes=out_shapes,
        owners=tuple(owners),
        op_traced=tuple(bool(hits.any()) for hits in owner_hits),
        op_sensitivity_source=tuple(int(np.argmax(row)) for row in same_sensitivity),
        param_paths=param_paths,
        param_kinds=tuple(kinds),
        param_shapes=param_shapes,
        violations=tuple(violations),
    )
