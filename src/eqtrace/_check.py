import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._algorithm import AbstractAlgorithm
from ._cell import AbstractCell
from ._custom_types import ExampleInput
from ._structure import CellStructure, analyse
from ._validation import example_input, require_example_input
from .nn._sequential import Sequential


@dataclasses.dataclass(frozen=True)
class StructureReport:
    """What `eqtrace.check` found. `str(report)` reads as plain text.

    **Attributes:**

    - `cells`: the structure of each recurrent cell (`None` for stateless layers).
    - `violations`: every broken diagonal assumption, in plain words (empty if none).
    - `trace_floats`, `trace_bytes`: the size of the algorithm's trace for one sample (`None`
      if the algorithm cannot trace the model).
    """

    algorithm: str
    cells: tuple[CellStructure | None, ...]
    trace_floats: int | None
    trace_bytes: int | None

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
        return not self.violations

    def __str__(self) -> str:
        lines = [f"eqtrace.check with {self.algorithm}:"]
        for i, cell in enumerate(self.cells):
            if cell is None:
                lines.append(f"  layer {i}: stateless (exact gradient within the step)")
                continue
            lines.append(
                f"  layer {i}: {cell.cell_name}, {cell.num_leaves} state leaf(s) "
                f"{list(cell.state_paths)} of neuron shape {cell.neuron_shape}"
            )
            for path, kind, a, u, traced in zip(
                cell.op_paths,
                cell.op_types,
                cell.op_input_shapes,
                cell.op_output_shapes,
                cell.op_traced,
            ):
                how = "traced" if traced else "read-out only, exact gradient through `output`"
                lines.append(f"    synaptic op {path} ({kind}): input {a} -> output {u}, {how}")
            for path, kind, shape in zip(cell.param_paths, cell.param_kinds, cell.param_shapes):
                how = {
                    "elementwise": "per-neuron, exact element-wise trace",
                    "shared": "shared, dense (|h|, |p|) trace",
                }.get(kind, "NOT traced")
                lines.append(f"    parameter {path} {shape}: {how}")
            for v in cell.violations:
                lines.append(f"    VIOLATION: {v}")
        if self.trace_floats is None:
            lines.append(f"  trace memory per sample: {self.algorithm} cannot trace this model")
        else:
            lines.append(
                f"  trace memory per sample: {self.trace_floats:,} values "
                f"({self.trace_bytes:,} bytes)"
            )
        lines.append(
            "  structure: OK" if self.ok else f"  structure: {len(self.violations)} violation(s)"
        )
        return "\n".join(lines)


def trace_size(algorithm: AbstractAlgorithm, model: AbstractCell, x: ExampleInput | None = None):
    """`(values, bytes)` of `algorithm`'s trace of `model` for one sample."""
    state = model.init_state()
    trace = jax.eval_shape(algorithm.init_trace, model, state, x)
    leaves = jtu.tree_leaves(trace)
    floats = sum(math.prod(leaf.shape) for leaf in leaves)
    nbytes = sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)
    return floats, nbytes


def check(
    model: AbstractCell, algorithm: AbstractAlgorithm | None = None, x: ExampleInput | None = None
) -> StructureReport:
    """Checks the diagonal assumptions of `model` on a small random instance and reports what
    is traced and the trace memory per sample.

    For every cell it verifies that the state Jacobian with every synaptic op's input cut is
    element-wise, that each op output reaches one neuron, and that every parameter outside an
    op is per-neuron or small; violations name the state leaf, op or parameter involved. The
    diagonal rules run the same analysis when they first see a cell (at `init_trace`) and
    raise on a violation unless created with `strict=False`.

    **Arguments:**

    - `model`: a cell or `eqtrace.nn.Sequential`.
    - `algorithm`: the rule whose trace memory to report (default `eqtrace.DRTRL()`).
    - `x`: an example input of one step; needed when the model declares no `input_size`.

    **Returns:** a `StructureReport`; `print` it, or test `report.ok`.
    """
    from ._algorithms._drtrl import DRTRL

    algorithm = DRTRL(strict=False) if algorithm is None else algorithm
    x = example_input(model) if x is None else x
    require_example_input(model, x)
    layers = model.layers if isinstance(model, Sequential) else (model,)
    cells = []
    layer_input = x
    for layer in layers:
        if isinstance(layer, AbstractCell):
            state = layer.init_state()
            cells.append(analyse(layer, state, layer_input))
            _, layer_input = jax.eval_shape(layer, state, layer_input)
        else:
            cells.append(None)
            layer_input = jax.eval_shape(layer, layer_input)
    if getattr(algorithm, "strict", False):
        # Report the memory even when the structure is violated.
        algorithm = eqx.tree_at(lambda a: a.strict, algorithm, False)
    assert algorithm is not None
    try:
        floats, nbytes = trace_size(algorithm, model, x)
    except ValueError:  # The algorithm cannot trace this model; the violations say why.
        floats = nbytes = None
    return StructureReport(type(algorithm).__name__, tuple(cells), floats, nbytes)
