"""The plan: what a rule knows about a model before its first step, prepared once.

`prepare(algorithm, model, x)` walks the model layer by layer, outside `jit`, and records per
layer the rule as configured for it (`AbstractAlgorithm.for_layer`), the structure that rule
reads from the cell (`AbstractAlgorithm.cell_structure`), the layout of its trace (from
`jax.eval_shape` of `init_cell_trace`, which raises the rule's refusal) and the neuron axes of
that trace and of the layer's weights (what `eqtrace.make_shardings` splits along a model
axis). Each layer's rule holds its structure (`with_structure`), so the steps read it instead
of analysing the cell. `init_trace`, `step`, `steps`, `eqtrace.check`, `eqtrace.trace_size` and
`eqtrace.make_shardings` read these facts from a plan, building one when they are not given
one. See `docs/architecture.md`, "The plan".
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._algorithm import AbstractAlgorithm
from ._algorithms._diagonal import op_dtype
from ._cell import AbstractCell, has_parameters
from ._custom_types import ExampleInput
from ._ops import algebra, op_params
from ._probing import concrete
from ._sequential import Sequential
from ._structure import CellStructure
from ._validation import check_model, example_input, is_key, require_example_input


@dataclasses.dataclass(frozen=True, eq=False)
class LayerPlan:
    """What the plan holds for one layer of the model (the model itself if it is a cell).

    **Attributes:**

    - `rule`: the rule that runs this layer, as configured for it (what
      `AbstractAlgorithm.for_layer` returns; `ExactWindows(rule)` keeps its windows, and
      `EProp` the read-out decay of the layer after it) and holding its structure
      (`AbstractAlgorithm.with_structure`), or `None` for a layer the rule does not
      trace: a stateless layer, a cell without parameters, and every layer of a network whose
      rule traces the recurrent core as one system (`per_layer = False`, exact RTRL).
    - `structure`: the structure the rule reads from the cell (a `CellStructure` for the
      diagonal rules, SnAp-n's mask for `SnAp`), or `None` if it needs none (`RTRL`, `UORO`)
      or traces no cell here.
    - `input`: the layout of the layer's input of one step (`jax.ShapeDtypeStruct`s).
    - `trace`: the layout of the layer's trace for one sample (`jax.ShapeDtypeStruct`s), or
      `None` if the layer has no trace of its own.
    - `neuron_axes`: a pytree shaped like `trace` giving, for each trace array, the axis that
      holds the neurons (of an op's output or of the cell), or `None` for an array without one;
      itself `None` if the rule's trace has no neuron axes.
    - `weight_axes`: for each floating array of the layer (in the order of
      `jax.tree_util.tree_leaves(eqx.filter(layer, eqx.is_inexact_array))`), the axis along
      which the output index of the op holding it varies, or `None`.
    """

    rule: AbstractAlgorithm | None
    structure: Any
    input: Any
    trace: Any = None
    neuron_axes: Any = None
    weight_axes: tuple[int | None, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """The prepared plan of an online rule for a model, from `eqtrace.prepare`: static (no
    arrays of the model, only layouts and structure records) and computed once, outside `jit`.

    **Attributes:**

    - `algorithm`: the rule the plan is for.
    - `network`: whether the model is an `eqtrace.nn.Sequential` (else a single cell).
    - `layers`: a `LayerPlan` per layer of the network, or one for a cell.
    - `trace`: the layout of the whole trace for one sample (`jax.ShapeDtypeStruct`s), shaped
      as `algorithm.init_trace` returns it: a tuple over the layers for a network under a
      per-layer rule, the recurrent core's trace under exact RTRL.
    """

    algorithm: AbstractAlgorithm
    network: bool
    layers: tuple[LayerPlan, ...]
    trace: Any

    @property
    def neuron_axes(self) -> Any:
        """Per trace array, the axis that holds the neurons (or `None`), shaped like `trace`;
        `None` if a traced layer's rule has no neuron axes, or if the rule traces a network's
        recurrent core as one system."""
        if self.network and not self.algorithm.per_layer:
            return None
        if any(lp.trace is not None and lp.neuron_axes is None for lp in self.layers):
            return None
        axes = tuple(lp.neuron_axes for lp in self.layers)
        return axes if self.network else axes[0]

    @property
    def trace_floats(self) -> int:
        """The number of values in the trace of one sample (PRNG keys not counted)."""
        leaves = jtu.tree_leaves(self.trace)
        return sum(math.prod(leaf.shape) for leaf in leaves if not is_key(leaf))

    @property
    def trace_bytes(self) -> int:
        """The size of the trace of one sample in bytes, with PRNG keys (8 bytes each)."""
        # `dtype.itemsize` rather than `jnp.dtype(...)`, which refuses a key's dtype.
        leaves = jtu.tree_leaves(self.trace)
        return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves)


def prepare(
    algorithm: AbstractAlgorithm, model: AbstractCell, x: ExampleInput | None = None
) -> Plan:
    """Prepares `algorithm` for `model`: analyses each cell's structure once, configures the
    rule per layer and lays out its trace, raising the rule's refusal (`eqtrace.StructureError`
    for a structure outside it) before any step runs.

    Call it outside `jax.jit`, once per model architecture and rule: the plan depends only on
    the model's structure, shapes and static fields, not on parameter values, so one plan
    serves every copy of the model that training produces. `init_trace`, `step`, `steps`,
    `eqtrace.check`, `eqtrace.trace_size` and `eqtrace.make_shardings` read it (`plan=`), and
    build one themselves when they are not given one; `eqtrace.make_online_step` prepares one
    on its first call and keeps it.

    **Arguments:**

    - `algorithm`: the online rule, e.g. `eqtrace.DRTRL()`.
    - `model`: a cell or `eqtrace.nn.Sequential`.
    - `x`: an example input of one step of one sample (only its shape and dtype are used),
      needed when the model does not declare an `input_size`.

    **Returns:** an `eqtrace.Plan`.
    """
    plan, errors = build_plan(algorithm, model, x)
    if errors:
        raise errors[0]
    return plan


def check_plan(owner: str, plan: Plan, algorithm: AbstractAlgorithm, model: AbstractCell) -> None:
    """Refuses a plan prepared for another kind of rule or another model's layers."""
    if not isinstance(plan, Plan):
        raise TypeError(
            f"{owner}: `plan` must be an `eqtrace.Plan`, from `eqtrace.prepare(algorithm, "
            f"model, x)`, but received {type(plan).__name__}."
        )
    layers = model.layers if isinstance(model, Sequential) else (model,)
    fits = (
        type(plan.algorithm) is type(algorithm)
        and plan.network == isinstance(model, Sequential)
        and len(plan.layers) == len(layers)
    )
    if not fits:
        raise ValueError(
            f"{owner}: `plan` was prepared for {type(plan.algorithm).__name__} on a model of "
            f"{len(plan.layers)} layer(s), but is used for {type(algorithm).__name__} on "
            f"{type(model).__name__} of {len(layers)} layer(s). Prepare it for this rule and "
            "model: `eqtrace.prepare(algorithm, model, x)`."
        )


def _abstract(tree: Any) -> Any:
    return jtu.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype) if eqx.is_array(a) else a, tree
    )


def build_plan(
    algorithm: AbstractAlgorithm, model: AbstractCell, x: ExampleInput | None = None
) -> tuple[Plan, list[ValueError]]:
    """The plan, and the refusals met on the way (in layer order; the first is the one a step
    raises). A layer whose rule refuses it gets no rule, structure or trace when its rule
    cannot be configured, and no trace when its trace cannot be laid out; `eqtrace.check`
    reports the rest."""
    if not isinstance(algorithm, AbstractAlgorithm):
        raise TypeError(
            "prepare: `algorithm` must be an online rule (an instance of "
            f"`eqtrace.AbstractAlgorithm`), but received {algorithm!r}."
        )
    check_model("prepare", "model", model)
    x = example_input(model) if x is None else x
    require_example_input(model, x)
    x = _abstract(x)
    state = eqx.filter_eval_shape(model.init_state)
    errors: list[ValueError] = []
    if not isinstance(model, Sequential):
        layer = _cell_plan(algorithm, model, state, x, errors)
        return Plan(algorithm, False, (layer,), layer.trace), errors
    layers = []
    whole = algorithm.per_layer
    for i, (layer, s) in enumerate(zip(model.layers, state)):
        if whole and isinstance(layer, AbstractCell) and has_parameters(layer):
            consumer = model.layers[i + 1] if i + 1 < len(model.layers) else None
            try:
                rule = algorithm.for_layer(layer, consumer)
            except ValueError as error:
                errors.append(error)
                layers.append(_unconfigured(algorithm, layer, s, x))
            else:
                layers.append(_cell_plan(rule, layer, s, x, errors))
        else:
            layers.append(LayerPlan(rule=None, structure=None, input=x))
        x = _layer_output(model, i, layer, s, x)
    if whole:
        trace = tuple(lp.trace for lp in layers)
    else:
        core = model.core
        try:
            trace = _abstract(
                eqx.filter_eval_shape(
                    algorithm.init_cell_trace,
                    core,
                    concrete(state[: len(core.layers)]),
                    concrete(layers[0].input),
                )
            )
        except ValueError as error:
            errors.append(error)
            trace = None
    return Plan(algorithm, True, tuple(layers), trace), errors


def _layer_output(model: Sequential, i: int, layer, state, x) -> Any:
    """The layout of layer `i`'s output for an input laid out as `x`, refusing a layer that
    cannot take that input (layer sizes that do not chain) with an error naming it."""
    try:
        if isinstance(layer, AbstractCell):
            return _abstract(eqx.filter_eval_shape(layer, state, concrete(x))[1])
        return _abstract(eqx.filter_eval_shape(layer, concrete(x)))
    except (TypeError, ValueError) as error:
        received = jtu.tree_map(lambda a: f"{a.dtype}{list(a.shape)}", x)
        before = f"the output of layer {i - 1}" if i else "the model's input"
        raise ValueError(
            f"prepare: layer {i} of the `Sequential` ({type(layer).__name__}) cannot take "
            f"{before}, {received} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Make each layer's input size the previous layer's output size (layers: "
            + ", ".join(type(layer).__name__ for layer in model.layers)
            + ")."
        ) from error


def traced_discrete_arrays(model: Any) -> list[str]:
    """The paths of `model`'s integer and boolean arrays that are tracers: under a `jax.jit` or
    `eqx.filter_jit` that takes the model as an argument, its masks, sign vectors and index
    tables have no value the structure analysis can read."""
    return [
        jtu.keystr(path)
        for path, leaf in jtu.tree_leaves_with_path(model)
        if isinstance(leaf, jax.core.Tracer)
        and not jnp.issubdtype(leaf.dtype, jnp.inexact)
        and not is_key(leaf)
    ]


def traced_note(model: Any) -> str:
    """Why a plan prepared inside a trace may differ from the one prepared outside, and the
    fix; empty if the model's integer and boolean arrays are known."""
    paths = traced_discrete_arrays(model)
    if not paths:
        return ""
    return (
        f"The integer or boolean arrays {', '.join(f'`{p}`' for p in paths[:4])}"
        f"{' …' if len(paths) > 4 else ''} of {type(model).__name__} are traced here (a "
        "`jax.jit` or `eqx.filter_jit` that takes the model as an argument traces every "
        "array), so the structure analysis cannot read their values (masks, signs, index "
        "tables) and takes them as any value; outside `jit` it reads them, so the plan (the "
        "structure, the trace's layout) may differ from the one `init_trace` prepared. "
        "Prepare the plan outside `jit` and pass it, `plan = eqtrace.prepare(rule, model, x)` "
        "then `rule.step(model, state, trace, x, plan=plan)`, or `jit` the step of "
        "`eqtrace.make_online_step(rule, static)`, which keeps them static. "
    )


def _with_traced_note(error: ValueError, cell) -> ValueError:
    """`error`, prefixed with `traced_note(cell)` when the cell's integer or boolean arrays are
    traced: the refusal may come from values the analysis could not read (a permutation read
    as any index table mixes every neuron), which its own message cannot say."""
    note = traced_note(cell)
    if not note:
        return error
    wrapped = type(error)(note + "The analysis then found: " + str(error))
    wrapped.__cause__ = error
    return wrapped


def _cell_plan(rule: AbstractAlgorithm, cell, state, x, errors: list[ValueError]) -> LayerPlan:
    """The plan of one cell run by `rule` (already configured for it)."""
    if not has_parameters(cell):
        return LayerPlan(rule=None, structure=None, input=x)
    try:
        structure = rule.cell_structure(cell, concrete(state), concrete(x))
    except ValueError as error:  # A structure no diagonal rule takes; the refusal says why.
        errors.append(_with_traced_note(error, cell))
        return LayerPlan(rule=rule, structure=None, input=x)
    # The rule that runs this cell reads its structure from now on; its `init_cell_trace`
    # raises its refusal of the structure.
    rule = rule.with_structure(structure)
    try:
        trace = _abstract(
            eqx.filter_eval_shape(rule.init_cell_trace, cell, concrete(state), concrete(x))
        )
    except ValueError as error:
        errors.append(_with_traced_note(error, cell))
        return LayerPlan(rule=rule, structure=structure, input=x)
    neuron_axes, weight_axes = None, ()
    # A diagonal rule's structure; other rules' records (SnAp-n's mask) have no op sites.
    if isinstance(structure, CellStructure):
        site_axes = _site_axes(cell, structure)
        neuron_axes = rule.trace_neuron_axes(structure, site_axes, trace)
        weight_axes = _weight_axes(cell, structure, site_axes)
    return LayerPlan(
        rule=rule,
        structure=structure,
        input=x,
        trace=trace,
        neuron_axes=neuron_axes,
        weight_axes=weight_axes,
    )


def _unconfigured(algorithm: AbstractAlgorithm, cell, state, x) -> LayerPlan:
    """The plan of a cell the rule cannot be configured for: its structure only, if any."""
    try:
        structure = algorithm.cell_structure(cell, concrete(state), concrete(x))
    except ValueError:
        structure = None
    return LayerPlan(rule=None, structure=structure, input=x)


def _site_axes(cell, structure: CellStructure) -> tuple[Any, ...]:
    """Per call site, for each weight of its op, the axis along which the output index
    varies (`None` if none or several)."""
    with jax.ensure_compile_time_eval():
        return tuple(
            _output_axes(op, site.input_shape, site.output_shape, site.reach)
            for op, site in zip(structure.site_modules(cell), structure.sites)
        )


def _weight_axes(cell, structure: CellStructure, site_axes) -> tuple[int | None, ...]:
    """For each floating array of `cell`, in traversal order, its op's output axis (`None`
    outside the called ops)."""
    by_weight: dict[int, int | None] = {}  # id of a weight array -> its axis
    for op, axes in zip(structure.site_modules(cell), site_axes):
        leaves = jtu.tree_leaves(op_params(op))
        for weight, axis in zip(leaves, jtu.tree_leaves(axes, is_leaf=is_axis)):
            by_weight[id(weight)] = axis
    arrays = jtu.tree_leaves(eqx.filter(cell, eqx.is_inexact_array))
    return tuple(by_weight.get(id(w)) for w in arrays)


def is_axis(node: Any) -> bool:
    """Leaves of a pytree of axes: an axis, or `None`."""
    return node is None or isinstance(node, int)


def _output_axes(op, input_shape, output_shape, reach) -> Any:
    """For each weight of `op`, the one axis along which its output index varies (`None` if
    none or several): spread an index per output over the weights (`OpAlgebra.spread`) and
    see along which axis it changes. `None` for an array whose weights reach several outputs
    (`reach`): neither it nor its trace is split."""
    # Under a trace (a plan built inside `jit`) the op's arrays are abstract: the index's
    # spread depends only on their shapes for the ops whose traces are split.
    op = jtu.tree_map(
        lambda a: jnp.ones(a.shape, a.dtype) if isinstance(a, jax.core.Tracer) else a, op
    )
    dtype = jnp.promote_types(op_dtype(op), jnp.float32)
    index = jnp.arange(1, math.prod(output_shape) + 1, dtype=dtype).reshape(output_shape)
    spread = algebra(op).spread(op, jnp.zeros(input_shape, op_dtype(op)), index)

    def varying(s, w):
        values = np.broadcast_to(np.asarray(s), w.shape)
        axes = [a for a in range(values.ndim) if np.any(np.diff(values, axis=a) != 0)]
        return axes[0] if len(axes) == 1 else None

    reached = iter(reach)
    return jtu.tree_map(
        lambda w, s: varying(s, w) if next(reached) is None else None, op_params(op), spread
    )
