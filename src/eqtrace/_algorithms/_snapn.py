"""SnAp-n: RTRL's influence matrix kept only on the entries the immediate Jacobian reaches in
`n − 1` further steps of the cell's dependency pattern, stored compactly."""

import copy
import dataclasses
import hashlib
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._algorithm import AbstractAlgorithm
from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._memo import structural_memo
from .._sparsity import identity_colours, pullback_pattern
from .._structure import StructureError, require_output_readout
from ._rtrl import flat_transition, real_ravel


class SnApTrace(eqx.Module):
    """SnAp-n's influence matrix on its mask, per bucket of parameters that share a mask
    column size: `blocks[b][g, a, k] = ∂h[rows[g, a]]/∂θ[cols[g, k]]` for the groups `g` of
    parameters whose mask columns are the same set of state elements (padding entries are
    zero)."""

    blocks: tuple[Float[Array, "_groups _rows _cols"], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class SnApStructure:
    """SnAp-n's mask of one cell, read from the code of its step (`_sparsity`), and what a
    step needs to compute the influence on it: index arrays (NumPy) and colourings of the
    Jacobians' rows. Compared and hashed by a digest of its contents, as a rule holds it as a
    static field."""

    cell_name: str
    n: int
    #: Sizes of the flattened real state and parameters (`|h|`, `|θ|`).
    state_size: int
    param_size: int
    #: The number of influence entries kept: the mask's non-zeros.
    mask_size: int
    #: The number of influence entries RTRL can reach (the pattern's closure).
    reachable_size: int
    #: The smallest `n` whose mask is the closure (SnAp-n equals RTRL from there on).
    exact_from: int
    #: Per bucket (the groups whose masks keep the same number `c` of state elements), the
    #: state rows `(G, c)` and the parameter columns `(G, q)` of its groups (padding:
    #: `param_size`).
    rows: tuple[np.ndarray, ...]
    cols: tuple[np.ndarray, ...]
    #: The entries of `∂h_t/∂h_{t-1}` the update reads, and a colouring of its rows such
    #: that no row of a colour depends on the column of another's needed entry: one VJP per
    #: colour gives them all.
    state_needed: np.ndarray
    state_colours: np.ndarray
    #: A colouring of the rows of `∂h_t/∂θ` likewise, and per bucket where its non-zeros
    #: `(r, p)` go: the group, the position of `r` in the group's rows and of `p` in its
    #: columns, the colour of `r` and `p`, `(5, nnz)` (the immediate term is a scatter of
    #: the non-zeros, not a gather over the whole mask).
    param_colours: np.ndarray
    immediate: tuple[np.ndarray, ...]
    #: Primitives the analysis did not know (each counted as a full dependence).
    unknown: tuple[str, ...]
    digest: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        h = hashlib.sha1()
        for f in dataclasses.fields(self):
            if f.name == "digest":
                continue
            value = getattr(self, f.name)
            for part in value if isinstance(value, tuple) else (value,):
                if isinstance(part, np.ndarray):
                    h.update(repr((part.shape, part.dtype.str)).encode())
                    h.update(np.ascontiguousarray(part).tobytes())
                else:
                    h.update(repr(part).encode())
        object.__setattr__(self, "digest", h.hexdigest())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.digest == self.digest  # pyright: ignore

    def __hash__(self) -> int:
        return hash(self.digest)

    @property
    def stored_size(self) -> int:
        """The number of values the compact trace stores (the mask plus padding)."""
        return sum(r.shape[0] * r.shape[1] * c.shape[1] for r, c in zip(self.rows, self.cols))


def _bool_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The boolean matrix product `a · b`: dense (BLAS) while the operands are small, sparse
    beyond (where the patterns of large cells are sparse, or the analysis too large anyway)."""
    if a.size + b.size <= 5 * 10**7:
        return (a.astype(np.float32) @ b.astype(np.float32)) > 0
    import scipy.sparse as sparse

    product = sparse.csr_matrix(a.astype(np.float32)) @ sparse.csr_matrix(b.astype(np.float32))
    return product.toarray() > 0


def _colour_rows(needed: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """A greedy colouring of the rows of a Jacobian of dependency pattern `pattern` (`-1`
    for a row with no entry `needed`), such that a VJP with a cotangent of ones on one
    colour's rows gives each needed entry apart: no other row of that colour depends on the
    needed entry's column. (A VJP sums the whole rows, needed or not.)"""
    rows = pattern.shape[0]
    conflict = _bool_product(needed, pattern.T)
    conflict |= conflict.T
    colours = np.full(rows, -1, np.int32)
    for r in np.flatnonzero(needed.any(axis=1)):
        taken = set(colours[conflict[r] & (colours >= 0)].tolist())
        colour = 0
        while colour in taken:
            colour += 1
        colours[r] = colour
    return colours


def _real_patterns(cell: AbstractCell, state: State, x: Any) -> tuple[Any, Any, tuple]:
    """The patterns of `∂h_t/∂h_{t-1}` `(|h|, |h|)` and `∂h_t/∂θ` `(|h|, |θ|)` of the cell's
    step on its flattened real state and parameters (`real_ravel`, as `RTRL` lays them out),
    read from the code of its pullback; and the primitives the analysis did not know."""
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    h, unravel_state = real_ravel(state)
    theta, unravel_params = real_ravel(params)

    def step(h, theta, static, x):
        new_state, _ = eqx.combine(unravel_params(theta), static)(unravel_state(h), x)
        return real_ravel(new_state)[0]

    def pulled(h, theta, static, x, cotangent):
        return jax.vjp(lambda h, t: step(h, t, static, x), h, theta)[1](cotangent)

    try:
        # The steps take the Jacobians' rows by VJPs, as RTRL does: refuse a step that reverse
        # mode cannot differentiate before any step runs (the pattern itself could be read in
        # forward mode).
        # (`static` closed over: it may hold functions, which are not abstract arrays.)
        jax.eval_shape(lambda h, theta, x, c: pulled(h, theta, static, x, c), h, theta, x, h)
        pattern = pullback_pattern(step, (h, theta, static, x), (0, 1), identity_colours, (2,))
    except Exception as error:  # noqa: BLE001 - no pattern, no mask: say why
        raise StructureError(
            f"SnAp cannot read the dependency pattern of {type(cell).__name__}'s step from the "
            f"code of its pullback ({type(error).__name__}: {str(error).splitlines()[0]}), so "
            "it has no mask to keep the influence matrix on and no VJPs to fill it. Make the "
            "step differentiable in reverse mode (a `lax.scan` or a `fori_loop` with static "
            "bounds instead of a `while_loop`), as `eqtrace.RTRL()` needs too."
        ) from error
    ((from_state,), (from_params,)) = pattern.leaves
    return from_state.T, from_params.T, pattern.unknown


@structural_memo(4)
def analyse_snap(cell: AbstractCell, state: State, x: Any, n: int) -> SnApStructure:
    """SnAp-n's mask of `cell` and the index arrays and colourings its steps use."""
    state_pattern, immediate, unknown = _real_patterns(cell, state, x)
    num_state, num_params = immediate.shape
    # The influence after k steps from zero has the pattern `∪_{j<k} Dʲ I`: grow it n − 1
    # times, and once more (at most) to tell whether the mask is the closure.
    reach, mask, exact_from = immediate, None, None
    for k in range(1, n + 1):
        if k == n:
            mask = reach
        grown = reach | _bool_product(state_pattern, reach)
        if np.array_equal(grown, reach):
            exact_from = k
            break
        reach = grown
    if mask is None:
        mask = reach
    if exact_from is None:  # not closed within n steps: how far the closure is
        closure, exact_from = reach, n + 1
        while True:
            grown = closure | _bool_product(state_pattern, closure)
            if np.array_equal(grown, closure):
                break
            closure, exact_from = grown, exact_from + 1
        reachable = int(closure.sum())
    else:
        reachable = int(mask.sum())

    # Group the parameters by their mask column (the set of state elements they keep).
    columns = np.ascontiguousarray(np.packbits(mask.T, axis=1))
    # Each packed column as one opaque value: `np.unique` on a 1-D array, fast.
    keys = columns.view(np.dtype((np.void, columns.shape[1]))).reshape(-1)
    _, group_of = np.unique(keys, return_inverse=True)
    group_of = group_of.reshape(-1)
    order = np.argsort(group_of, kind="stable")
    starts = np.searchsorted(group_of[order], np.arange(group_of.max() + 1))
    rows_of, cols_of = {}, {}
    for g in range(group_of.max() + 1):
        members = order[starts[g] : starts[g + 1] if g + 1 < len(starts) else len(order)]
        kept = np.flatnonzero(mask[:, members[0]])
        if kept.size:  # parameters that do not reach the state get their gradient exactly
            rows_of.setdefault(kept.size, []).append(kept)
            cols_of.setdefault(kept.size, []).append(members)
    rows, cols = [], []
    for size in sorted(rows_of):
        width = max(len(m) for m in cols_of[size])
        rows.append(np.stack(rows_of[size]).astype(np.int32))
        padded = np.full((len(cols_of[size]), width), num_params, np.int32)
        for i, members in enumerate(cols_of[size]):
            padded[i, : len(members)] = members
        cols.append(padded)

    # The entries of the state Jacobian the update reads: those within each group's rows.
    needed = np.zeros((num_state, num_state), bool)
    for r in rows:
        needed[r[:, :, None], r[:, None, :]] = True
    state_needed = needed & state_pattern
    param_colours = _colour_rows(immediate, immediate)
    # Where each non-zero of the immediate Jacobian lies in the blocks.
    bucket_of = np.full(num_params, -1, np.int64)
    group_in = np.full(num_params, -1, np.int64)
    position_in = np.full(num_params, -1, np.int64)
    for b, c in enumerate(cols):
        g, k = np.nonzero(c < num_params)
        bucket_of[c[g, k]], group_in[c[g, k]], position_in[c[g, k]] = b, g, k
    r, p = np.nonzero(immediate)
    placed = []
    for b, rows_b in enumerate(rows):
        row_position = np.full((rows_b.shape[0], num_state), -1, np.int64)
        row_position[np.arange(rows_b.shape[0])[:, None], rows_b] = np.arange(rows_b.shape[1])
        here = bucket_of[p] == b
        rb, pb = r[here], p[here]
        g = group_in[pb]
        placed.append(
            np.stack([g, row_position[g, rb], position_in[pb], param_colours[rb], pb]).astype(
                np.int32
            )
        )
    return SnApStructure(
        cell_name=type(cell).__name__,
        n=n,
        state_size=num_state,
        param_size=num_params,
        mask_size=int(mask.sum()),
        reachable_size=reachable,
        exact_from=exact_from,
        rows=tuple(rows),
        cols=tuple(cols),
        state_needed=state_needed,
        state_colours=_colour_rows(state_needed, state_pattern),
        param_colours=param_colours,
        immediate=tuple(placed),
        unknown=unknown,
    )


def _seeds(colours: np.ndarray, dtype) -> jax.Array:
    """Per colour, a cotangent of ones on its rows: `(num_colours, rows)`."""
    count = int(colours.max()) + 1 if colours.size and colours.max() >= 0 else 0
    seeds = np.zeros((count, colours.size))
    seeds[colours[colours >= 0], np.flatnonzero(colours >= 0)] = 1
    return jnp.asarray(seeds, dtype)


class SnAp(AbstractAlgorithm[SnApTrace]):
    """SnAp-n (Menick et al., *Practical real time recurrent learning with a sparse
    approximation*, ICLR 2021): RTRL's influence matrix `M_t = ∂h_t/∂θ` kept only on a fixed
    sparsity pattern,

    $$
    M_t = P_n ⊙ (J_t M_{t-1} + I_t), \\qquad
    P_n = \\mathrm{pattern}\\Big(\\sum_{k=0}^{n-1} \\bar J^{\\,k} \\bar I\\Big),
    $$

    with `J_t = ∂h_t/∂h_{t-1}`, `I_t = ∂h_t/∂θ` (the immediate Jacobian) and `J̄`, `Ī` their
    dependency patterns: `P_n` holds the entries `(i, θ_j)` where `θ_j` can reach `h_i` within
    `n` steps, the pattern of `M_n` from `M_0 = 0`. SnAp-1 keeps the immediate pattern; once
    `n` passes the pattern's diameter `P_n` holds every entry RTRL can reach and the rule is
    exact RTRL. The online gradient at step `t` is `M_tᵀ ḡ_t`.

    The patterns are read once from the code of the cell's pullback (`eqtrace.check` states
    what they give), conservatively: a primitive the analysis does not know counts as a
    dependence of everything on everything, so the mask can only grow. Boolean masks of the
    cell (`eqtrace.nn.Linear(mask=...)`) are read exactly.

    The influence is stored compactly: the parameters are grouped by their mask column (the
    set of state elements they keep), and each group holds a `(c, q)` block, padded within
    groups of equal `c`. A step reads `J_t` on each group's rows only, with one VJP per colour
    of its rows (no row of a colour depends on the column of another's entry: on a cell with
    full recurrent weights, one VJP per neuron), the immediate Jacobian likewise (one VJP for
    a cell whose parameters each reach one state element, as a GRU's) and adds its non-zeros
    to each block after one product; the dense `|h| × |θ|` matrix is never formed. Memory per
    sample: the mask's non-zeros plus padding (`eqtrace.trace_size`; `mask_size` gives the
    non-zeros). Compute per step: `Σ_g c_g² q_g` for the products plus the VJPs. At `n = 1`,
    on cells with one state leaf per neuron, `eqtrace.SnAp1` is the same rule, faster.

    A `Sequential` gets one SnAp-n trace per cell, as under `eqtrace.SnAp1`: paths between
    layers through later steps are cut, credit within a step is exact; use `eqtrace.RTRL()`
    for the whole network as one system.

    **Arguments:**

    - `n`: the number of steps of the pattern the mask follows (`n ≥ 1`; default 2).
    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf. Off by default.
    """

    n: int = 2
    check_finite: bool = False
    per_layer: ClassVar[bool] = True
    #: The mask of the cell this copy runs, set by `eqtrace.prepare` (`with_structure`).
    prepared_structure: SnApStructure | None = eqx.field(
        default=None, static=True, repr=False, kw_only=True
    )

    def __check_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ValueError(
                f"SnAp: `n` must be an integer ≥ 1 (the steps of the dependency pattern the "
                f"mask follows; 1 is SnAp-1), but received {self.n!r}."
            )

    def cell_structure(self, cell: AbstractCell, state: State, x: ExampleInput) -> SnApStructure:
        """SnAp-n's mask of `cell` and the index arrays its steps use, read from the code."""
        return analyse_snap(cell, state, x, int(self.n))

    def with_structure(self, structure: Any) -> "SnAp":
        prepared = copy.copy(self)
        object.__setattr__(prepared, "prepared_structure", structure)
        return prepared

    def structure_of(self, cell: AbstractCell, state: State, x: Any) -> SnApStructure:
        """The prepared structure, or the cell's analysed now."""
        if self.prepared_structure is not None:
            return self.prepared_structure
        return self.cell_structure(cell, state, x)

    def mask_size(self, model: AbstractCell, x: ExampleInput | None = None) -> int:
        """The number of influence entries SnAp-n keeps for `model` (summed over its cells):
        the memory per sample of the compact form without its padding, in values.

        **Arguments:**

        - `model`: a cell or `eqtrace.nn.Sequential`.
        - `x`: an example input of one step, if the model declares no `input_size`.

        **Returns:** the number of non-zeros of the mask `P_n`.
        """
        from .._plan import prepare

        plan = prepare(self, model, x)
        return sum(lp.structure.mask_size for lp in plan.layers if lp.structure is not None)

    def init_cell_trace(self, cell: AbstractCell, state: State, x: ExampleInput) -> SnApTrace:
        # As for RTRL: checked whenever the input is known (always at `step`).
        if x is not None:
            require_output_readout("SnAp", cell, state, x)
        structure = self.structure_of(cell, state, x)
        params = eqx.filter(cell, eqx.is_inexact_array)
        dtype = jnp.result_type(real_ravel(state)[0], real_ravel(params)[0])
        return SnApTrace(
            tuple(
                jnp.zeros((*r.shape, c.shape[1]), dtype)
                for r, c in zip(structure.rows, structure.cols)
            )
        )

    def cell_step(
        self, cell: AbstractCell, state: State, trace: SnApTrace, x: Input
    ) -> tuple[State, SnApTrace]:
        s = self.structure_of(cell, state, x)
        transition, h, theta, unravel_state, _ = flat_transition(cell, state, x)
        if not s.rows:  # no parameter reaches the state: nothing to trace
            return unravel_state(transition(h, theta)), trace
        # Reverse mode only (a cell with a `jax.custom_vjp` function runs, as under RTRL); one
        # forward pass serves both Jacobians' VJPs.
        new_h, pull = jax.vjp(transition, h, theta)

        def pull_state(c):
            return pull(c)[:1]

        def pull_params(c):
            return pull(c)[1:]

        dtype = trace.blocks[0].dtype
        size = s.state_size

        # `J_t` on the entries the update reads: one VJP per colour of its rows.
        seeds = _seeds(s.state_colours, new_h.dtype)
        if seeds.shape[0]:
            per_colour = jax.vmap(lambda c: pull_state(c)[0])(seeds)
            colour = np.maximum(s.state_colours, 0)
            jac = jnp.where(s.state_needed, per_colour[colour], 0).astype(dtype)
        else:
            jac = jnp.zeros((size, size), dtype)

        # `I_t` on the mask: one VJP per colour of its rows, each entry read where its row
        # is the parameter's owner in that colour.
        seeds = _seeds(s.param_colours, new_h.dtype)
        per_colour = jax.vmap(lambda c: pull_params(c)[0])(seeds).astype(dtype)

        blocks = []
        for block, rows, (g, a, k, colour, p) in zip(trace.blocks, s.rows, s.immediate):
            j_block = jac[rows[:, :, None], rows[:, None, :]]
            propagated = jnp.einsum("gab,gbq->gaq", j_block, block)
            blocks.append(propagated.at[g, a, k].add(per_colour[colour, p]))
        return unravel_state(new_h), SnApTrace(tuple(blocks))

    def cell_tangent(
        self, cell: AbstractCell, state: State, trace: SnApTrace, x: Input, params_tangent: Any
    ) -> State:
        s = self.structure_of(cell, state, x)
        _, unravel_state = real_ravel(state)
        delta, _ = real_ravel(params_tangent)
        delta = jnp.append(delta, jnp.zeros((), delta.dtype))  # the padding column
        out = jnp.zeros(s.state_size, trace.blocks[0].dtype if trace.blocks else delta.dtype)
        for block, rows, cols in zip(trace.blocks, s.rows, s.cols):
            out = out.at[rows].add(jnp.einsum("gaq,gq->ga", block, delta[cols]))
        return unravel_state(out.astype(delta.dtype))

    def cell_notes(self, cell: AbstractCell, state: State, x: Input) -> tuple[str, ...]:
        """SnAp-n's mask for `cell`, in plain words: its size against RTRL's, the stored
        size, and from which `n` the rule is exact RTRL."""
        s = self.structure_of(cell, state, x)
        dense = s.state_size * s.param_size
        lines = [
            f"SnAp-{s.n} keeps {s.mask_size} of the {dense} entries of the influence matrix "
            f"({s.state_size} state × {s.param_size} parameter values; RTRL can reach "
            f"{s.reachable_size}), stored as {s.stored_size} values with padding."
        ]
        if s.exact_from <= s.n:
            lines.append(
                f"Its mask is the pattern's closure (n ≥ {s.exact_from}): it equals exact RTRL."
            )
        else:
            lines.append(f"It equals exact RTRL from n = {s.exact_from} on.")
        if s.unknown:
            lines.append(
                "Primitives the analysis does not know, each counted as a full dependence: "
                + ", ".join(s.unknown)
                + "."
            )
        return tuple(lines)
