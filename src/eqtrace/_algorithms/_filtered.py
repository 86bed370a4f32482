"""`Filtered`: any weight-trace rule with e-prop's filter, the credit a cell's output carries
through the leak of the layer that reads it."""

import dataclasses
from typing import Any

from .._algorithm import AbstractAlgorithm
from ._drtrl import AbstractWeightTraceAlgorithm
from ._eprop import AbstractFiltered


class Filtered(AbstractFiltered):
    """A diagonal rule's eligibility traces, carried through the leak of the layer that reads
    each cell's output: e-prop's filter (`eqtrace.EProp`) for `eqtrace.DRTRL` and
    `eqtrace.SnAp1` alike.

    A per-layer rule runs each cell of an `eqtrace.nn.Sequential` with its own trace and sends
    the next layer the cell's output `z_t` differentiated through that trace, within the step.
    When the next layer keeps a leaky state, `q_t = κ q_{t-1} + P z_t + c` (an
    `eqtrace.nn.LeakyReadout`, a synaptic filter: any cell whose state Jacobian is a constant
    `κ I` and whose input Jacobian `P` does not depend on its state or input), a change of
    `z_s` reaches every later `q_t` as `κ^{t−s} P`, which the per-step credit drops: on a
    spiking network under a leaky read-out, D-RTRL's gradient loses most of its norm. This
    rule folds the leak into the trace of the cell's output,

    $$
    \\bar e_t = κ\\,\\bar e_{t-1} + \\frac{∂z_t}{∂h_t}\\, ε_t,
    $$

    with `ε_t` the wrapped rule's trace, and differentiates the output by `\\bar e_t`; the next
    layer's exact within-step `P` then gives `dq_t/dθ = Σ_{s≤t} κ^{t−s} P\\, dz_s/dθ`, the
    credit through its leak, exactly. `κ`, and whether the next layer has one, are read from
    that layer's code when the rule is prepared (`eqtrace.prepare`): which arrays the values
    of its two Jacobians depend on, never sampled values; a next layer whose leak depends on
    its state (a spiking layer's reset, a gate), its input or its parameters (a learnt time
    constant), or that the analysis cannot read, leaves the cell unfiltered, as the wrapped
    rule runs it. The filtered cell's output must be one value per neuron from that neuron's
    state, with no parameter acting on the output alone (checked, as for e-prop).

    For a feed-forward layer with element-wise recurrence under a leaky read-out (LIF, ALIF
    without recurrent weights) it is exact: equal to BPTT. `Filtered(eqtrace.DRTRL())` is
    `eqtrace.EProp()`; `Filtered(eqtrace.SnAp1())` adds SnAp-1's paths through each neuron's
    own recurrent weight. Memory per sample: the wrapped rule's trace plus `|θ|` for the
    filtered copy. Blocks of steps (`steps`, `eqtrace.make_online_block`) pass over the traces
    once per block, as the wrapped rule's do.

    **Arguments:**

    - `rule`: the rule whose traces are filtered, `eqtrace.DRTRL(...)` or `eqtrace.SnAp1(...)`
      (its `strict`, `trace_dtype` and `check_finite` apply).
    - `readout_decay`: `κ` of a leaky read-out of this cell's output, for a single cell whose
      read-out you apply yourself. Leave it `None` for an `eqtrace.nn.Sequential`: there each
      cell's `κ` comes from the layer after it.
    """

    # Checked in `__check_init__`, which names the rules it takes.
    rule: AbstractAlgorithm
    readout_decay: float | None = None

    def __check_init__(self):
        if not isinstance(self.rule, AbstractWeightTraceAlgorithm):
            raise TypeError(
                "Filtered: `rule` must be a rule with weight-shaped eligibility traces, "
                f"`eqtrace.DRTRL(...)` or `eqtrace.SnAp1(...)`, but received {self.rule!r}. "
                "(`eqtrace.EProp()` is `Filtered(eqtrace.DRTRL())` already.)"
            )
        if self.rule.prepared_structure is not None:
            raise TypeError(
                "Filtered: `rule` must be a rule as you build it, not one prepared for a cell "
                "(from `eqtrace.prepare(...).layers[i].rule`). Pass `eqtrace.DRTRL()` or "
                "`eqtrace.SnAp1()`."
            )

    @property
    def strict(self) -> bool:
        return self.rule.strict

    @property
    def check_finite(self) -> bool:
        return self.rule.check_finite

    def eligibility_rule(self) -> AbstractWeightTraceAlgorithm:
        assert isinstance(self.rule, AbstractWeightTraceAlgorithm)  # `__check_init__`
        return self.rule

    def relaxed(self) -> "Filtered":
        return dataclasses.replace(self, rule=self.rule.relaxed())

    def cell_notes(self, cell: Any, state: Any, x: Any) -> tuple[str, ...]:
        """The wrapped rule's notes, and the filter this cell's output gets."""
        notes = self.rule.cell_notes(cell, state, x)
        if self.readout_decay is None:
            return (
                *notes,
                "Filtered: no filter for this cell (the layer after it has no constant leak); "
                f"it runs as {type(self.rule).__name__}.",
            )
        return (
            *notes,
            f"Filtered: the traces of the output are filtered by κ = {self.readout_decay:.6g}, "
            "the leak of the layer after it.",
        )
