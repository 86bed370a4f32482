"""Where an online learner's arrays live on a device mesh: data and model parallelism.

Only layouts are decided here (`NamedSharding`s for `jax.device_put` and `jax.jit`); XLA
partitions the step and inserts the collectives, such as the all-reduce of the gradient over
the batch. The model-parallel layout follows from the diagonal rules' algebra: every
trace-sized update is element-wise along the output (neuron) axis of each synaptic op, so a
trace split along that axis, with the op's weights split the same way, is updated where it
lives; only per-neuron vectors (state, op inputs and outputs) cross devices.
"""

import functools
import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.tree_util as jtu
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ._algorithm import AbstractAlgorithm
from ._cell import AbstractCell
from ._custom_types import ExampleInput, State, Trace
from ._drivers import init_state_and_trace
from ._plan import Plan, check_plan, prepare
from ._sequential import Sequential
from ._validation import check_count


class Shardings(NamedTuple):
    """The layout of an online learner on a device mesh, from `eqtrace.make_shardings`: pytrees
    of `jax.sharding.NamedSharding` shaped like the parameters
    (`eqx.partition(model, eqx.is_inexact_array)[0]`), the batched state and the batched trace,
    and one sharding for inputs and targets with a leading time axis, `(T, B, ...)`.

    Pass them to `jax.device_put` (parameters, inputs), to `eqtrace.init_sharded` (state and
    trace), or as `in_shardings`/`out_shardings` of your own `jax.jit`.
    """

    params: Any
    state: Any
    trace: Any
    sequences: NamedSharding


def make_shardings(
    model: AbstractCell,
    algorithm: AbstractAlgorithm,
    mesh: Mesh,
    *,
    batch_axis: str = "batch",
    model_axis: str | None = None,
    x: ExampleInput | None = None,
    plan: Plan | None = None,
) -> Shardings:
    """The shardings of parameters, state, trace and input sequences for data parallelism, and
    optionally model parallelism, over `mesh`.

    Data parallel (`model_axis=None`): the batch axis of state, trace and inputs is split over
    the mesh axis `batch_axis`; the parameters are replicated. Model parallel (`model_axis`
    given; `DRTRL`, `SnAp1`, `PPProp`, `EProp`, or one of them in `ExactWindows`): in
    addition, each synaptic op's weights and their traces are split along the op's output
    (neuron) axis over `model_axis` — for a dense weight `(out, in)` and its D-RTRL trace
    `(batch, out, in, K)`, `out`; pp-prop's output traces `(batch, K, out)` likewise, e-prop's
    filtered copies `(batch, out, in)` along `out`, and the traces of per-neuron parameters
    along their neurons. The rest is replicated over `model_axis`: layers outside cells
    (read-outs), per-neuron parameters, the state, pp-prop's input traces, and any array whose
    axis does not divide by the size of `model_axis`. The model axis must be of type
    `AxisType.Auto`. The neuron axes come from the plan (`eqtrace.prepare`): each rule says
    where its trace holds the neurons.

    **Arguments:**

    - `model`: the cell or `eqtrace.nn.Sequential`.
    - `algorithm`: the online rule whose trace to lay out.
    - `mesh`: a `jax.sharding.Mesh` holding `batch_axis` (and `model_axis`).
    - `batch_axis`: the mesh axis that splits the batch.
    - `model_axis`: the mesh axis that splits the traces and weights along neurons, or `None`.
    - `x`: an example input of one step of one sample, when the model has no `input_size`.
    - `plan`: `eqtrace.prepare(algorithm, model, x)`, if prepared already (else it is prepared
      here); the layout of the trace and its neuron axes are read from it.

    **Returns:** a `Shardings`.
    """
    for name, axis in (("batch_axis", batch_axis), ("model_axis", model_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise ValueError(
                f"make_shardings: `{name}` must name an axis of `mesh`, whose axes are "
                f"{tuple(mesh.axis_names)}, but received {axis!r}. Build the mesh with that "
                f"axis, e.g. `jax.make_mesh((n,), ({axis!r},))`, or pass one of its axes."
            )
    kind = None if model_axis is None else mesh.axis_types[mesh.axis_names.index(model_axis)]
    if kind not in (None, AxisType.Auto):
        raise ValueError(
            f"make_shardings: the model axis {model_axis!r} of `mesh` must be of type "
            f"`AxisType.Auto`, but it is {kind}: "
            "under explicit sharding every op would have to say how to split its result, and "
            "a cell's neurons cross the op outputs' split. Build the mesh with "
            "`jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * "
            "len(names))`."
        )
    plan = prepare(algorithm, model, x) if plan is None else plan
    check_plan("make_shardings", plan, algorithm, model)
    state, trace = eqx.filter_eval_shape(model.init_state), plan.trace
    params = eqx.filter(model, eqx.is_inexact_array)
    if model_axis is None:
        param_axes = jtu.tree_map(lambda _: None, params)
        trace_axes = jtu.tree_map(lambda _: None, trace)
    else:
        param_axes, trace_axes = _neuron_axes(model, plan, params)
    size = mesh.shape[model_axis] if model_axis is not None else 1

    def split(shape, axis, batch):
        spec: list[str | None] = [None] * len(shape)
        if axis is not None and shape[axis] % size == 0:
            spec[axis] = model_axis
        return NamedSharding(mesh, PartitionSpec(*batch, *spec))

    return Shardings(
        params=jtu.tree_map(lambda w, a: split(w.shape, a, ()), params, param_axes),
        state=jtu.tree_map(lambda _: NamedSharding(mesh, PartitionSpec(batch_axis)), state),
        trace=jtu.tree_map(lambda e, a: split(e.shape, a, (batch_axis,)), trace, trace_axes),
        sequences=NamedSharding(mesh, PartitionSpec(None, batch_axis)),
    )


def init_sharded(
    model: AbstractCell,
    algorithm: AbstractAlgorithm,
    batch_size: int,
    shardings: Shardings,
    x: ExampleInput | None = None,
) -> tuple[State, Trace]:
    """The initial batched state and trace of `model`, created directly in their shardings:
    each device computes its own shard, and the whole trace never exists on one device.

    **Arguments:**

    - `model`, `algorithm`, `x`: as for `eqtrace.init_state_and_trace`.
    - `batch_size`: the number of samples; it must divide by the size of the batch mesh axis.
    - `shardings`: from `eqtrace.make_shardings` for this model and algorithm.

    **Returns:** `(state, trace)` with a leading batch axis, laid out as `shardings.state` and
    `shardings.trace`.
    """
    check_count("init_sharded", "batch_size", batch_size)
    mesh, spec = shardings.sequences.mesh, shardings.sequences.spec
    devices = math.prod(mesh.shape[axis] for axis in jtu.tree_leaves(spec[1]))
    if batch_size % devices:
        raise ValueError(
            f"init_sharded: `batch_size` must divide by the {devices} devices of the batch mesh "
            f"axis {spec[1]!r}, but received {batch_size}. Use a batch size that is a multiple "
            f"of {devices}."
        )
    init = functools.partial(init_state_and_trace, model, algorithm, batch_size, x)
    expected = jax.eval_shape(init)
    for name, tree, given in zip(("state", "trace"), expected, (shardings.state, shardings.trace)):
        if jtu.tree_structure(tree) != jtu.tree_structure(given):
            raise ValueError(
                f"init_sharded: `shardings.{name}` does not fit this model and algorithm: it has "
                f"{len(jtu.tree_leaves(given))} shardings where the {name} of "
                f"{type(model).__name__} under {type(algorithm).__name__} has "
                f"{len(jtu.tree_leaves(tree))} arrays, in another structure. Build the "
                "shardings for this model and rule: `eqtrace.make_shardings(model, "
                "algorithm, mesh)`."
            )
    return jax.jit(init, out_shardings=(shardings.state, shardings.trace))()


def _neuron_axes(model, plan: Plan, params) -> tuple[Any, Any]:
    """For every parameter and every (per-sample) trace array, the axis that holds the
    neurons of an op's output, or `None`: pytrees shaped like `params` and the trace, read
    from the plan."""
    trace_axes = plan.neuron_axes
    if trace_axes is None:
        raise ValueError(
            "make_shardings: `model_axis` splits the traces of the diagonal rules "
            "(`eqtrace.DRTRL`, `eqtrace.SnAp1`, `eqtrace.PPProp`, `eqtrace.EProp`) along "
            f"neurons, but received {type(plan.algorithm).__name__}, whose trace has no such "
            "axis. Pass `model_axis=None` (data parallel) or use one of those rules."
        )
    layers = model.layers if isinstance(model, Sequential) else (model,)
    by_weight: dict[int, int | None] = {}  # id of a weight array -> its axis
    for layer, layer_plan in zip(layers, plan.layers):
        weights = jtu.tree_leaves(eqx.filter(layer, eqx.is_inexact_array))
        for weight, axis in zip(weights, layer_plan.weight_axes):
            by_weight[id(weight)] = axis
    # Weights are matched by identity: `params` holds the model's own arrays.
    param_axes = jtu.tree_map(lambda w: by_weight.get(id(w)), params)
    return param_axes, trace_axes
