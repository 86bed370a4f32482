import dataclasses
from typing import NamedTuple

from ._algorithm import AbstractAlgorithm
from ._algorithms._drtrl import DRTRL
from ._cell import AbstractCell, has_parameters
from ._custom_types import ExampleInput
from ._plan import build_plan, prepare
from ._probing import concrete
from ._sequential import Sequential
from ._structure import CellStructure, ParamKind, ViolationKind
from ._validation import (
    check_example_input,
    check_model,
    example_input,
    require_example_input,
)


class TraceSize(NamedTuple):
    """The size of an algorithm's trace for one sample, as `eqtrace.trace_size` returns it.

    A named tuple: `values, nbytes = eqtrace.trace_size(algorithm, model)` unpacks it, and
    `f"{size}"` (or `str(size)`) reads `2,240 values (8,960 bytes)`.

    **Attributes:**

    - `values`: the number of values in the trace pytree.
    - `bytes`: its size in bytes, which includes the PRNG keys of rules that draw random
      numbers (`UORO`: 8 bytes each, not counted as values).
    """

    values: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.values:,} values ({self.bytes:,} bytes)"

    def __format__(self, format_spec: str) -> str:
        # A tuple's own `__format__` refuses any format spec (`f"{size:>30}"`).
        return format(str(self), format_spec)


_PARAM_LINES = {
    ParamKind.ELEMENTWISE: "per-neuron, exact element-wise trace",
    ParamKind.SHARED: "shared, dense (|h|, |p|) trace",
    ParamKind.READOUT: "does not reach the state, exact gradient through `output`",
    ParamKind.UNSUPPORTED: "NOT traced",
}


def _covered_lines(cell: CellStructure) -> list[str]:
    """How each call of an op and each other parameter of `cell` is traced. One that a
    violation names gets no line saying it is covered: its line points to the violation."""
    broken: dict[str, str] = {}
    for v in cell.violations:
        broken.setdefault(v.subject, f"see VIOLATION below: {v.kind}")
    # With a `y` other than `output(new_state)`, no gradient through `output` is exact.
    unlike_output = next(
        (broken[v.subject] for v in cell.violations if v.kind == ViolationKind.OUTPUT_NOT_OF_STATE),
        None,
    )
    lines = []
    for site in cell.sites:
        op = cell.ops[site.op]
        how = broken.get(site.name) or broken.get(op.path)
        if how is None and site.traced:
            how = "traced"
            # Arrays whose weights reach several outputs: a trace per (output, weight) pair.
            shared = [r for r in site.reach if r is not None and r.count > 1]
            if shared:
                how += "; per (output element reached, weight), for each state leaf: " + ", ".join(
                    f"`{r.path}`: {r.reached:,} (output, weight) pairs in {r.count} output colours"
                    for r in shared
                )
        elif how is None:
            how = unlike_output or "read-out only, exact gradient through `output`"
        lines.append(
            f"    synaptic op {site.name} ({op.type_name}): input {site.input_shape} -> output "
            f"{site.output_shape}, {how}"
        )
    for op in cell.ops:
        if not op.called:
            lines.append(f"    synaptic op {op.path}: never called; its arrays are parameters")
    for param in cell.params:
        how = broken.get(param.path) or _PARAM_LINES[param.kind]
        if param.kind == ParamKind.READOUT and param.path not in broken:
            if not param.read_by_output:  # Used in a `y` unlike `output`, or not at all.
                how = "reaches neither the state nor `output`"
                how += f"; {unlike_output}" if unlike_output else ""
            elif unlike_output:
                how = unlike_output
        lines.append(f"    parameter {param.path} {param.shape}: {how}")
    return lines


@dataclasses.dataclass(frozen=True)
class StructureReport:
    """What `eqtrace.check` found. `str(report)` reads as plain text.

    **Attributes:**

    - `algorithm`: the name of the rule checked.
    - `cells`: the diagonal structure of each recurrent cell (`None` for stateless layers, and
      for every layer under a rule that does not need it, such as `RTRL`).
    - `refusal`: the error the rule raises for this model, exactly as a step would raise it
      (`None` if the rule accepts the model).
    - `violations`: every broken diagonal assumption, in plain words (empty if none). A strict
      rule refuses a model with violations; with `strict=False` it runs as an approximation.
    - `trace_floats`, `trace_bytes`: the size of the rule's trace for one sample (`None` if
      the rule cannot trace the model even with `strict=False`).
    - `notes`: what the rule, in particular, traces in each cell (for `SnAp1`, the op inputs
      that carry each neuron's self-paths), in plain words.
    - `layer_rules`: per layer, how the rule runs it when it configures itself for that layer
      from the layer after it (e.g. `EProp(readout_decay=0.95)` under a leaky read-out), else
      `None`.
    - `unread`: the layers whose structure the rule needs but could not read because it
      refuses the model (`refusal` says why).
    """

    algorithm: str
    cells: tuple[CellStructure | None, ...]
    trace_floats: int | None
    trace_bytes: int | None
    refusal: str | None = None
    notes: tuple[str, ...] = ()
    layer_rules: tuple[str | None, ...] = ()
    unread: tuple[int, ...] = ()

    @property
    def violations(self) -> tuple[str, ...]:
        return tuple(
            f"{cell.cell_name}: {v}"
            for cell in self.cells
            if cell is not None
            for v in cell.violations
        )

    @property
    def ok(self) -> bool:
        """Whether the rule accepts the model and every diagonal assumption holds."""
        return self.refusal is None and not self.violations

    def __str__(self) -> str:
        lines = [f"eqtrace.check with {self.algorithm}:"]
        for i, cell in enumerate(self.cells):
            if i in self.unread:
                lines.append(f"  layer {i}: structure not read: refused, see REFUSED below")
                continue
            if cell is None:
                lines.append(f"  layer {i}: no diagonal structure needed")
                continue
            lines.append(
                f"  layer {i}: {cell.cell_name}, {cell.num_leaves} state leaf(s) "
                f"{list(cell.state_paths)} of neuron shape {cell.neuron_shape}"
            )
            if i < len(self.layer_rules) and self.layer_rules[i] is not None:
                lines.append(f"    run as {self.layer_rules[i]}")
            lines.extend(_covered_lines(cell))
            for v in cell.violations:
                lines.append(f"    VIOLATION: {v}")
        lines.extend(f"  {note}" for note in self.notes)
        if self.trace_floats is None:
            lines.append(f"  trace memory per sample: {self.algorithm} cannot trace this model")
        else:
            size = TraceSize(self.trace_floats, self.trace_bytes)  # type: ignore[arg-type]
            lines.append(f"  trace memory per sample: {size}")
        if self.refusal is not None:
            lines.append(f"  REFUSED by {self.algorithm}: {self.refusal}")
        if self.ok:
            lines.append("  structure: OK")
        elif self.violations:
            lines.append(f"  structure: {len(self.violations)} violation(s)")
        else:
            lines.append("  structure: refused")
        return "\n".join(lines)


def trace_size(
    algorithm: AbstractAlgorithm, model: AbstractCell, x: ExampleInput | None = None
) -> TraceSize:
    """The size of `algorithm`'s trace of `model` for one sample (computed from shapes only):
    `eqtrace.prepare(algorithm, model, x)`'s `trace_floats` and `trace_bytes`.

    **Arguments:**

    - `algorithm`: the online rule, e.g. `eqtrace.DRTRL()`.
    - `model`: a cell or `eqtrace.nn.Sequential`.
    - `x`: an example input of one step (only its shape and dtype are used), needed when the
      model does not declare an `input_size`.

    **Returns:** a `TraceSize`, the named tuple `(values, bytes)`: the number of values in the
    trace pytree and its size in bytes, which includes the PRNG keys of rules that draw random
    numbers (`UORO`: 8 bytes each, not counted as values). `print` it, or multiply
    `.bytes` by the batch size for a batch.
    """
    plan = prepare(algorithm, model, x)
    return TraceSize(plan.trace_floats, plan.trace_bytes)


def check(
    model: AbstractCell, algorithm: AbstractAlgorithm | None = None, x: ExampleInput | None = None
) -> StructureReport:
    """Checks `model` for `algorithm` and reports what is traced, the trace memory per sample,
    and whether (and why) the algorithm refuses the model.

    For the diagonal rules it verifies, for every cell, that the state Jacobian with every
    synaptic op's input cut is element-wise, that each op output reaches one neuron, that op
    weights act only through calls of the op, and that every parameter outside an op is
    per-neuron, small or does not reach the state; violations name the state leaf, op or
    parameter involved. `report.refusal` is exactly the error a step would raise: the report
    reads the plan that `eqtrace.prepare` builds (the same one a step builds), and, if the
    rule is strict, a violation is its refusal. Wrappers and composites (`ExactWindows`,
    `EProp`) are checked through the rules they configure per layer.

    **Arguments:**

    - `model`: a cell or `eqtrace.nn.Sequential`.
    - `algorithm`: the rule to check for (default `eqtrace.DRTRL(strict=False)`).
    - `x`: an example input of one step; needed when the model declares no `input_size`.

    **Returns:** a `StructureReport`; `print` it, or test `report.ok` and `report.refusal`.
    """
    check_model("check", "model", model)
    algorithm = DRTRL(strict=False) if algorithm is None else algorithm
    if x is not None:
        check_example_input(model, model.init_state(), x)
    x = example_input(model) if x is None else x
    require_example_input(model, x)
    layers = model.layers if isinstance(model, Sequential) else (model,)
    plan, errors = build_plan(algorithm, model, x)
    refusal = str(errors[0]) if errors else None
    relaxed = algorithm.relaxed()
    if errors and relaxed is not algorithm:
        # Report the memory and notes even when the structure is violated.
        sized, errors = build_plan(relaxed, model, x)
    else:
        sized = plan
    floats, nbytes = (None, None) if errors else (sized.trace_floats, sized.trace_bytes)
    notes, layer_rules, unread = [], [], []
    for i, (layer, lp) in enumerate(zip(layers, plan.layers)):
        # Configured otherwise than given (the structure it holds is not in its `repr`).
        configured = lp.rule is not None and repr(lp.rule) != repr(algorithm)
        layer_rules.append(repr(lp.rule) if configured and plan.network else None)
        if not isinstance(layer, AbstractCell) or not algorithm.per_layer:
            continue
        if not has_parameters(layer):
            notes.append(f"layer {i}: {type(layer).__name__} has no parameters: no trace")
            continue
        if refusal is not None and lp.structure is None and sized.layers[i].structure is None:
            # A traced cell whose analysis the refusal stopped (not one that needs none).
            unread.append(i)
        if sized.layers[i].rule is not None:
            rule = sized.layers[i].rule
            try:
                lines = rule.cell_notes(layer, layer.init_state(), concrete(lp.input))
            except ValueError:  # The refusal says why.
                continue
            notes.extend(f"layer {i}: {line}" for line in lines)
    return StructureReport(
        type(algorithm).__name__,
        # The diagonal structures only (SnAp-n's mask is in its notes).
        tuple(
            lp.structure if isinstance(lp.structure, CellStructure) else None for lp in plan.layers
        ),
        floats,
        nbytes,
        refusal,
        notes=tuple(notes),
        layer_rules=tuple(layer_rules),
        unread=tuple(unread),
    )
