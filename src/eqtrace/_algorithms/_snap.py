"""SnAp-1: D-RTRL's weight-shaped traces, carried by the per-neuron block of the full state
Jacobian (the paths through each neuron's own recurrent weights included)."""

import dataclasses
from typing import Any, ClassVar

import equinox as eqx
import jax

from .._cell import AbstractCell
from .._custom_types import ExampleInput, Input, State
from .._ops import algebra
from .._structure import CellStructure, InputOwners, StructureError, input_owners
from ._drtrl import AbstractWeightTraceAlgorithm


class SnAp1Trace(eqx.Module):
    """SnAp-1's trace, laid out as D-RTRL's: per call of a synaptic op in a step, the op's
    parameters' traces for all state leaves, shaped `(*W.shape, K)` (`None` for read-outs);
    per other parameter, its element-wise (or dense) trace (`None` if it does not reach the
    state)."""

    ops: tuple[Any, ...]
    params: tuple[jax.Array | None, ...]


class SnAp1(AbstractWeightTraceAlgorithm[SnAp1Trace]):
    """SnAp-1 (Menick et al., *Practical real time recurrent learning with a sparse
    approximation*, ICLR 2021; the recurrent treatment of OSTL, Bohnstingl et al., 2022):
    D-RTRL's trace, propagated with the per-neuron `K×K` block of the *full* state Jacobian.

    $$
    ε_t[k, o] = \\sum_m B_o(J_t[k, m]) ⊙ ε_{t-1}[m, o] + \\mathrm{VJP}_W[op_o(a_t; ·)](∂h^k_t/∂u_o),
    $$

    with the same immediate term and gradient `∇W_o = Σ_k B_o(ḡ^k) ⊙ ε_t[k, o]` as
    `eqtrace.DRTRL`. Where D-RTRL's `D_t[k, m] = ∂h^k_t/∂h^m_{t-1}` holds every op output
    fixed, `J_t` is the Jacobian of the step with every op *restricted to each neuron's own
    inputs*: an op output element owned by neuron `n` sees only the op input elements that
    depend on neuron `n` alone. So `J_t` adds to `D_t` the paths that stay within a neuron: its
    own recurrent weight `W[n, n]`, a gate's self-dependence (`z_n = σ(W_z h)_n` through
    `W_z[n, n]`) and chains of them (a GRU's candidate through its own reset gate). It equals
    the diagonal of the full Jacobian `∂h_t/∂h_{t-1}` wherever that Jacobian is diagonal, and
    there SnAp-1 equals RTRL: for a layer whose recurrent op is masked to its diagonal it is
    exact (equal to BPTT) under a stateless read-out, where D-RTRL is not. With full recurrent
    weights it drops the paths through other neurons, as D-RTRL does, but keeps each neuron's
    own.

    The input elements each neuron owns are found once per cell structure, like D-RTRL's
    output owners (`eqtrace.check` lists them), and the self-paths cost one gather of the
    weights `W[j, i]` with `i`, `j` of one neuron per dense op, within D-RTRL's single
    linearisation: the cost per step and the memory, `O(K·|θ|)` per sample, are D-RTRL's.
    An op input element that depends on several neurons (e.g. a normalised state) has no
    self-path of its own; `strict` refuses such a cell, and with `strict=False` its paths are
    cut, as in D-RTRL. Blocks of steps (`steps`, `eqtrace.make_online_block`) work as for
    D-RTRL, with `J_t` in the transition products.

    **Arguments:**

    - `strict`: raise if the cell breaks the diagonal assumptions (see `eqtrace.check`) or an
      op input element depends on several neurons. With `strict=False` the rule runs anyway
      as an approximation.
    - `trace_dtype`: dtype in which the weight traces are stored; the update is computed in
      the parameters' dtype. Defaults to the parameters' dtype.
    - `check_finite`: raise (through `eqx.error_if`) as soon as the state or trace holds a NaN
      or inf. Off by default: the check costs a pass over the trace every step.
    """

    strict: bool = True
    trace_dtype: Any = None
    check_finite: bool = False
    trace_type: ClassVar[type] = SnAp1Trace

    def cell_structure(self, cell: AbstractCell, state: State, x: ExampleInput) -> CellStructure:
        """D-RTRL's structure with the owners of the op inputs, which SnAp-1's self-paths go
        through."""
        structure = super().cell_structure(cell, state, x)
        owners = input_owners(cell, state, x, structure)
        return dataclasses.replace(structure, input_owners=owners)

    def refuse(self, cell: AbstractCell, structure: CellStructure, state: State) -> None:
        super().refuse(cell, structure, state)
        owners = _owners(structure)
        shared = [
            f"`{site.name}` ({count} of {owners.owners[i].size})"
            for i, (site, count) in enumerate(zip(structure.sites, owners.shared))
            if site.traced and count
        ]
        if self.strict and shared:
            raise StructureError(
                f"SnAp1 cannot trace {structure.cell_name}: input elements of the op(s) "
                f"{', '.join(shared)} depend on several neurons' states (e.g. a "
                "normalisation or a sum over neurons before the op), so they have no "
                "self-path of their own. Feed each op input from one neuron, use "
                "`eqtrace.RTRL()`, or pass `strict=False` to SnAp1 to cut those paths as "
                "D-RTRL does."
            )

    def restriction(self, structure: CellStructure) -> tuple[Any, ...]:
        owners = _owners(structure)
        return tuple(
            _restricted_map(owners.owners[i], site.owners)
            if site.traced and (owners.owners[i] >= 0).any()
            else None
            for i, site in enumerate(structure.sites)
        )

    def cell_notes(self, cell: AbstractCell, state: State, x: Input) -> tuple[str, ...]:
        """What SnAp-1 adds to D-RTRL for `cell`, in plain words: for each op, how many of its
        input elements carry a self-path, and how many depend on several neurons; one sentence
        per traced op call."""
        structure = self.required_structure(cell, state, x)
        owners = _owners(structure)
        lines = []
        for site, own, shared in zip(structure.sites, owners.owners, owners.shared):
            if not site.traced:
                continue
            owned, size = int((own >= 0).sum()), own.size
            if owned == 0 and shared == 0:
                lines.append(
                    f"SnAp-1 adds no self-path through `{site.name}`: none of its {size} input "
                    "elements depends on a neuron's state (they come from the layer's input), "
                    "so it is traced as by D-RTRL."
                )
                continue
            line = (
                f"SnAp-1 self-paths through `{site.name}`: {owned} of its {size} input elements "
                "each depend on one neuron's state, and that neuron's own weights from them "
                "(e.g. the diagonal of a recurrent matrix) carry its trace"
            )
            if shared:
                line += f"; {shared} depend on several neurons' states (their paths cut)"
            lines.append(line + ".")
        return tuple(lines)


def _owners(structure: CellStructure) -> InputOwners:
    """The input owners SnAp-1's `cell_structure` analysed with the structure."""
    assert structure.input_owners is not None, "analysed by `SnAp1.cell_structure`"
    return structure.input_owners


def _restricted_map(in_owners, out_owners):
    """The op's restricted derivative `(op, a, δa) -> δu` for these owners."""

    def restricted(op, a, tangent):
        return algebra(op).restricted(op, a, tangent, in_owners, out_owners)

    return restricted
