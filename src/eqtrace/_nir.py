"""Export to and import from NIR, the Neuromorphic Intermediate Representation.

NIR describes neurons in continuous time; eqtrace steps in discrete time. The bridge is one
discretisation, used both ways: every state is integrated exactly over a step of `dt` with its
input held constant during the step (zero-order hold), the synaptic current before the
membrane, all states start at zero, and an edge that closes a cycle carries the value of the
previous step. Under it, `τ dv/dt = (v_leak − v) + R I` becomes
`v_t = α v_{t−1} + (1 − α)(v_leak + R I_t)` with `α = exp(−dt/τ)`, which is eqtrace's
`v_t = α v_{t−1} + i_t` for `R = 1/(1 − α)` and `v_leak = 0`.
"""

import math
import os
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np

from ._cell import AbstractCell
from ._sequential import Sequential
from .nn._feedback import RandomFeedback
from .nn._linear import Linear
from .nn._readout import LeakyReadout
from .nn._spiking import ALIF, LIF
from .nn._surrogate import AbstractSurrogate, FastSigmoid


if TYPE_CHECKING:
    import nir


#: `r = 1/(1 − α)` as exported times `1 − α` as imported is one to an ulp or two; such a gain is
#: taken as exactly one, so that a round trip does not rescale the weights by round-off.
_UNIT_GAIN = 1e-12
#: Relative tolerance for recognising `−ϑ I` (the reset by subtraction) in a foreign graph.
_RESET_RTOL = 1e-9

_DISCRETISATION = (
    "each state integrated exactly over one step dt with its input held constant during the "
    "step (zero-order hold), synaptic current before membrane; states start at zero; an edge "
    "closing a cycle carries the previous step's value"
)
_NO_CONSTANT_WITH_SYNAPSE = (
    "a constant drive of the membrane cannot be imported with a synapse: eqtrace's only "
    "constant input, a bias, passes through the synapse."
)
_DENSE_LAYERS = "eqtrace.nn.Linear, eqx.nn.Linear, eqtrace.nn.RandomFeedback"


def _nir_module():
    # Imported on first use: `import eqtrace` works without NIR installed.
    try:
        import nir
    except ImportError as error:
        raise ImportError(
            "eqtrace's NIR export and import need the `nir` package: "
            '`pip install "eqtrace[nir]"` (or `pip install nir`).'
        ) from error
    return nir


def _leak(dt: float, tau: np.ndarray) -> np.ndarray:
    """`1 − exp(−dt/τ)`, accurate also for `dt ≪ τ`."""
    return -np.expm1(-dt / tau)


class _Builder:
    def __init__(self):
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []

    def add(self, name: str, node: Any, source: str, to: str | None = None) -> str:
        """Adds `node` fed by `source` (and feeding `to`, which closes a loop)."""
        self.nodes[name] = node
        self.edges.append((source, name))
        if to is not None:
            self.edges.append((name, to))
        return name


def _describe(layer: Any) -> str:
    if isinstance(layer, eqx.Module):
        return type(layer).__name__
    return f"function {getattr(layer, '__name__', repr(layer))}"


def _is_dense(layer: Any) -> bool:
    return isinstance(layer, (Linear, eqx.nn.Linear, RandomFeedback))


def _dense_arrays(op: Any, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(op, RandomFeedback):
        op = op.op  # its forward pass is the wrapped op's; `B` acts in the backward pass only
    if isinstance(op, eqx.nn.Linear) and "scalar" in (op.in_features, op.out_features):
        raise ValueError(
            f'to_nir: {where} is an eqx.nn.Linear with in_features or out_features "scalar", '
            "but NIR's Linear and Affine map vectors to vectors. Build it with integer sizes "
            "(1 for a single value)."
        )
    weight = op.weight
    if isinstance(op, Linear) and op.mask is not None:
        weight = jnp.where(op.mask, weight, 0)  # NIR has no masks: masked weights are zeros
    return np.asarray(weight), None if op.bias is None else np.asarray(op.bias)


def _dense_node(nir, op: Any, where: str):
    weight, bias = _dense_arrays(op, where)
    return nir.Linear(weight=weight) if bias is None else nir.Affine(weight=weight, bias=bias)


def _sizes(index: int, layer: Any) -> tuple[int, int]:
    """The input and output sizes of a layer `to_nir` exports; refuses any other layer."""
    if isinstance(layer, (LIF, ALIF)):
        return layer.input_size, layer.hidden_size
    if isinstance(layer, LeakyReadout):
        return layer.input_size, layer.output_size
    if _is_dense(layer):
        weight, _ = _dense_arrays(layer, f"layer {index}")
        return weight.shape[1], weight.shape[0]
    if isinstance(layer, AbstractCell):
        why = (
            "Only eqtrace's spiking cells have NIR counterparts; a rate-based or other cell "
            "cannot be described with NIR's neuron primitives."
        )
    elif isinstance(layer, eqx.Module) and not isinstance(layer, eqx.nn.Lambda):
        why = "eqtrace exports no other layer."
    else:
        why = (
            "A stateless function (an activation, a reshape) has no NIR primitive: NIR's only "
            "non-linearity is the spike. Remove it from the network to export."
        )
    raise TypeError(
        f"to_nir: layer {index} ({_describe(layer)}) has no NIR counterpart. eqtrace exports "
        'eqtrace.nn.LIF, eqtrace.nn.ALIF (with reset="subtract"), eqtrace.nn.LeakyReadout '
        f"and dense layers ({_DENSE_LAYERS}), chained in an eqtrace.nn.Sequential. {why}"
    )


def _layers(model: Any) -> list[Any]:
    if isinstance(model, Sequential):
        return [layer for inner in model.layers for layer in _layers(inner)]
    return [model]


def _time_step(layers: list[Any], dt: float | None) -> float:
    if dt is not None:
        if not 0 < dt < math.inf:
            raise ValueError(f"to_nir: `dt` must be a positive float, but received {dt}.")
        return float(dt)
    steps = sorted({layer.dt for layer in layers if isinstance(layer, (LIF, ALIF, LeakyReadout))})
    if len(steps) > 1:
        raise ValueError(
            f"to_nir: the cells step with different time steps dt = {steps}, but a NIR graph "
            "has one clock. Pass `dt`, the time step of the graph in its time unit: each cell's "
            "time constants are then scaled by dt / cell.dt, which keeps its decay per step."
        )
    return steps[0]


def _time_constants(log_tau: Any, tau: float, size: int, scale: float) -> np.ndarray:
    if log_tau is None:
        return np.full(size, tau * scale)
    return np.exp(np.asarray(log_tau, np.float64)) * scale


def _export_spiking(nir, graph: _Builder, index: int, cell: LIF | ALIF, source: str, dt: float):
    name = f"layer{index}"
    if isinstance(cell, ALIF) and cell.reset == "zero":
        raise ValueError(
            f'to_nir: layer {index} (ALIF) has reset="zero", which NIR cannot express exactly. '
            "NIR's resetting neurons (IF, LIF, CubaLIF) set their membrane to v_reset when that "
            "membrane crosses their own fixed threshold, and no NIR node multiplies a signal by "
            "a spike; ALIF's zero reset clears the membrane v when v − β·a crosses ϑ, a "
            'threshold that moves. ALIF with reset="subtract" is exported exactly (membrane, '
            'Threshold and adaptation loop): train ALIF(..., reset="subtract"), or use LIF, '
            "which exports with either reset."
        )
    size, scale = cell.hidden_size, dt / cell.dt
    zeros, threshold = np.zeros(size), np.full(size, cell.threshold)
    tau_mem = _time_constants(cell.log_tau_mem, cell.tau_mem, size, scale)
    tau_syn = _time_constants(cell.log_tau_syn, cell.tau_syn, size, scale)
    r_mem, r_syn = 1 / _leak(dt, tau_mem), 1 / _leak(dt, tau_syn)
    inputs = graph.add(
        f"{name}.input_weight", _dense_node(nir, cell.input_op, f"layer {index}"), source
    )
    if isinstance(cell, LIF) and cell.reset == "zero":
        # NIR's LIF resets to v_reset = 0 after a spike, as eqtrace's zero reset does.
        if cell.synapse:
            neuron = nir.CubaLIF(
                tau_syn=tau_syn,
                tau_mem=tau_mem,
                r=r_mem,
                v_leak=zeros,
                v_threshold=threshold,
                v_reset=zeros,
                w_in=r_syn,
            )
        else:
            neuron = nir.LIF(
                tau=tau_mem, r=r_mem, v_leak=zeros, v_threshold=threshold, v_reset=zeros
            )
        spikes = target = graph.add(f"{name}.lif", neuron, inputs)
    else:
        # NIR has no reset by subtraction: the membrane is an LI, its spikes a Threshold, and
        # the spikes return to the membrane through −ϑ I at the next step, like any loop.
        target = inputs
        if cell.synapse:
            synapse = nir.LI(tau=tau_syn, r=r_syn, v_leak=zeros)
            target = graph.add(f"{name}.synapse", synapse, inputs)
        membrane = nir.LI(tau=tau_mem, r=r_mem, v_leak=zeros)
        membrane = graph.add(f"{name}.membrane", membrane, target)
        target = target if cell.synapse else membrane
        spikes = graph.add(f"{name}.spike", nir.Threshold(threshold=threshold), membrane)
        graph.add(f"{name}.reset", nir.Linear(weight=-np.diag(threshold)), spikes, membrane)
        if isinstance(cell, ALIF):
            # The adaptation `−β a` (a_t = ρ a_{t−1} + s_{t−1}) is an LI fed by the spikes
            # whose output adds to the Threshold's input: r = −β/(1 − ρ).
            tau_adapt = _time_constants(cell.log_tau_adapt, cell.tau_adapt, size, scale)
            beta = cell.beta if cell.beta_per_neuron is None else cell.beta_per_neuron
            beta = np.broadcast_to(np.asarray(beta, np.float64), (size,))
            adaptation = nir.LI(tau=tau_adapt, r=-beta / _leak(dt, tau_adapt), v_leak=zeros)
            graph.add(f"{name}.adaptation", adaptation, spikes, spikes)
    if cell.recurrent_op is not None:
        recurrent = _dense_node(nir, cell.recurrent_op, f"layer {index}")
        graph.add(f"{name}.recurrent_weight", recurrent, spikes, target)
    return spikes


def _export_layer(nir, graph: _Builder, index: int, layer: Any, source: str, dt: float) -> str:
    if isinstance(layer, (LIF, ALIF)):
        return _export_spiking(nir, graph, index, layer, source, dt)
    if isinstance(layer, LeakyReadout):
        # y_t = κ y_{t−1} + (1 − κ)(W x_t + b) is the exact step of an LI with R = 1.
        weights = _dense_node(nir, layer.input_op, f"layer {index}")
        weights = graph.add(f"layer{index}.weight", weights, source)
        size = layer.output_size
        tau = np.full(size, layer.tau * dt / layer.dt)
        readout = nir.LI(tau=tau, r=np.ones(size), v_leak=np.zeros(size))
        return graph.add(f"layer{index}.readout", readout, weights)
    return graph.add(f"layer{index}.linear", _dense_node(nir, layer, f"layer {index}"), source)


def to_nir(model: AbstractCell, *, dt: float | None = None) -> "nir.NIRGraph":
    """Exports a spiking network to a NIR graph (the Neuromorphic Intermediate
    Representation), which simulators and neuromorphic hardware read.

    Each layer becomes NIR nodes, chained from an `Input` node to an `Output` node:

    - `LIF(reset="zero")`: its input weights as a `Linear` node, then a `LIF` node, or a
      `CubaLIF` node with a synapse.
    - `LIF(reset="subtract")`: NIR's `LIF` resets to a fixed `v_reset`, so the neuron is
      spelled out: input weights, [an `LI` node for the synapse,] an `LI` node for the
      membrane, a `Threshold` node for the spikes, and a `Linear` node of weights `−ϑ I` from
      the spikes back to the membrane (the reset by subtraction).
    - `ALIF(reset="subtract")`: the same, and an `LI` node from the `Threshold` back to itself
      that adds `−β a` to its input (the adaptation).
    - Recurrent weights: a `Linear` node from the spikes back to the neurons (to the synapse,
      if there is one).
    - `LeakyReadout`: an `Affine` node, then an `LI` node.
    - `eqtrace.nn.Linear`, `eqx.nn.Linear`, `eqtrace.nn.RandomFeedback`: an `Affine` node (a
      `Linear` node without a bias).

    Masked weights are exported as zeros, learnt time constants (`learn_tau=True`) per
    neuron. The parameters are chosen so that integrating NIR's equations exactly over each
    step, with the input held constant during the step, reproduces eqtrace's step: a membrane
    `τ dv/dt = (v_leak − v) + R I` gets `R = 1/(1 − exp(−dt/τ))` and `v_leak = 0`. NIR does
    not carry the surrogate gradient (a NIR spike is the Heaviside step) nor the feedback
    matrix of `RandomFeedback`. `ALIF(reset="zero")` has no exact NIR form and is refused
    with a `ValueError`, as layers without a NIR counterpart are with a `TypeError`. See the
    NIR page of the documentation.

    **Arguments:**

    - `model`: an `eqtrace.nn.Sequential` of the layers above, or one spiking cell.
    - `dt`: the time step, in the time unit of the graph. By default the cells' own `dt`, and
      the time constants are written in the cells' unit (ms by default). When given, each
      cell's time constants are scaled by `dt / cell.dt`, which keeps its decay per step:
      `dt=1e-3` writes a network of 1 ms steps in seconds.

    **Returns:**

    A `nir.NIRGraph`; `nir.write(path, graph)` saves it. Its metadata records `dt` and the
    discretisation (NIR asks readers not to rely on metadata).
    """
    nir = _nir_module()
    if not isinstance(model, AbstractCell):
        raise TypeError(
            "to_nir: `model` must be an eqtrace.nn.Sequential or a spiking cell, but received "
            f"{_describe(model)}. Wrap the layers in eqtrace.nn.Sequential([...])."
        )
    layers = _layers(model)
    sizes = [_sizes(index, layer) for index, layer in enumerate(layers)]
    for index in range(1, len(layers)):
        if sizes[index][0] != sizes[index - 1][1]:
            raise ValueError(
                f"to_nir: layer {index} ({_describe(layers[index])}) takes {sizes[index][0]} "
                f"inputs, but layer {index - 1} ({_describe(layers[index - 1])}) gives "
                f"{sizes[index - 1][1]} outputs. Make each layer's input size the previous "
                "layer's output size."
            )
    step = _time_step(layers, dt)
    graph = _Builder()
    source = "input"
    graph.nodes[source] = nir.Input(input_type={"input": np.array([sizes[0][0]])})
    for index, layer in enumerate(layers):
        source = _export_layer(nir, graph, index, layer, source, step)
    graph.add("output", nir.Output(output_type={"output": np.array([sizes[-1][1]])}), source)
    metadata = {"source": "eqtrace", "dt": step, "discretisation": _DISCRETISATION}
    return nir.NIRGraph(nodes=graph.nodes, edges=graph.edges, metadata=metadata)


_PASS = object()  # an inner Input or Output node of a subgraph: it only passes its signal on


def _inline_subgraphs(nir, graph, prefix: str = "") -> tuple[dict[str, Any], list]:
    """The nodes and edges of `graph` with every nested `NIRGraph` node replaced by its
    contents (as snnTorch writes recurrent layers)."""
    nodes: dict[str, Any] = {}
    edges: list[tuple[str, str]] = []

    def port(name: str, kind) -> str:
        node = graph.nodes.get(name)  # an unknown name is refused with the chain
        if not isinstance(node, nir.NIRGraph):
            return prefix + name
        ports = [key for key, inner in node.nodes.items() if isinstance(inner, kind)]
        if len(ports) != 1:
            raise ValueError(
                f"from_nir: the subgraph {prefix + name!r} has {len(ports)} "
                f"{kind.__name__} nodes; an edge to or from a subgraph needs exactly one. "
                "Give the subgraph one Input and one Output node."
            )
        return f"{prefix}{name}.{ports[0]}"

    for name, node in graph.nodes.items():
        if isinstance(node, nir.NIRGraph):
            inner_nodes, inner_edges = _inline_subgraphs(nir, node, f"{prefix}{name}.")
            for key, inner in inner_nodes.items():
                nodes[key] = _PASS if isinstance(inner, (nir.Input, nir.Output)) else inner
            edges += inner_edges
        else:
            nodes[prefix + name] = node
    edges += [(port(a, nir.Output), port(b, nir.Input)) for a, b in graph.edges]
    for key in [key for key, node in nodes.items() if node is _PASS]:
        sources = [a for a, b in edges if b == key]
        targets = [b for a, b in edges if a == key]
        edges = [e for e in edges if key not in e] + [(a, b) for a in sources for b in targets]
        del nodes[key]
    return nodes, edges


def _kind(node: Any) -> str:
    return f"nir.{type(node).__name__}"


def _reaches(start: str, goal: str, successors: dict[str, list[str]], avoid: set[str]) -> bool:
    seen, stack = set(avoid), [start]
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            stack += successors[node]
    return False


def _chain(nir, nodes: dict[str, Any], edges: list) -> tuple[list[str], list[tuple]]:
    """The path of nodes from the Input to the Output, and the loops hanging off it, as
    `(source on the path, node on the loop, target on the path)`."""
    successors: dict[str, list[str]] = {key: [] for key in nodes}
    predecessors: dict[str, list[str]] = {key: [] for key in nodes}
    for a, b in edges:
        if a not in nodes or b not in nodes:
            raise ValueError(
                f"from_nir: the edge ({a!r}, {b!r}) names a node the graph does not have. "
                "Fix the edge or add the node."
            )
        successors[a].append(b)
        predecessors[b].append(a)
    inputs = [key for key, node in nodes.items() if isinstance(node, nir.Input)]
    outputs = [key for key, node in nodes.items() if isinstance(node, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"from_nir: the graph has {len(inputs)} Input node(s) {inputs} and "
            f"{len(outputs)} Output node(s) {outputs}, but eqtrace imports a network with one "
            "input and one output. Split the graph, or merge its inputs into one vector."
        )
    path, sink = [inputs[0]], outputs[0]
    while path[-1] != sink:
        onward = [
            b
            for b in successors[path[-1]]
            if b not in path and _reaches(b, sink, successors, set(path))
        ]
        if not onward:
            raise ValueError(
                f"from_nir: no path leads from node {path[-1]!r} to the Output node {sink!r}. "
                "Connect the Input to the Output through the layers."
            )
        if len(onward) > 1:
            raise ValueError(
                f"from_nir: node {path[-1]!r} feeds {sorted(onward)}, each of which leads to "
                "the output: the graph branches (parallel paths or a skip connection), but "
                "eqtrace imports a chain of layers, with loops only from a layer's neurons back "
                "to the same layer. Re-export the network as a chain."
            )
        path.append(onward[0])
    position = {key: i for i, key in enumerate(path)}
    for a, b in edges:
        if a in position and b in position and position[b] != position[a] + 1:
            raise ValueError(
                f"from_nir: the edge ({a!r}, {b!r}) joins two nodes of the chain that do not "
                "follow each other. A skip connection is not supported; a recurrent loop must "
                "pass through a weight node (Linear or Affine) from the neurons back to them."
            )
    loops = []
    for key, node in nodes.items():
        if key in position:
            continue
        sources, targets = predecessors[key], successors[key]
        if not (
            len(sources) == len(targets) == 1
            and sources[0] in position
            and targets[0] in position
            and position[targets[0]] <= position[sources[0]]
        ):
            raise ValueError(
                f"from_nir: node {key!r} ({_kind(node)}) is neither on the path from the "
                "input to the output nor a loop from a layer's neurons back to that layer "
                f"through this one node: it receives from {sources} and sends to {targets}. "
                "eqtrace imports a chain of layers with such loops (recurrent weights, the "
                "reset by subtraction, the adaptation of ALIF)."
            )
        loops.append((sources[0], key, targets[0]))
    return path, loops


def _unsupported(name: str, node: Any, nir) -> TypeError:
    if isinstance(node, (nir.IF, nir.I)):
        hint = " An integrator without leak (τ = ∞) has no eqtrace cell."
    elif isinstance(node, nir.CubaLI):
        hint = " eqtrace's LeakyReadout has one time constant, not two."
    else:
        hint = ""
    return TypeError(
        f"from_nir: node {name!r} is a {_kind(node)}, which eqtrace cannot import. eqtrace "
        "imports a chain of Linear and Affine (weights), LIF and CubaLIF (neurons that reset "
        "to zero), LI (a read-out, or a membrane before a Threshold: the reset by "
        f"subtraction) and Threshold nodes, between one Input and one Output.{hint} Convert "
        "the node in the tool that wrote the graph, or replace it by these primitives."
    )


def _uniform(values: np.ndarray) -> bool:
    return bool(np.all(values == values[0]))


def _snap(gain: np.ndarray) -> np.ndarray:
    return np.where(np.abs(gain - 1) <= _UNIT_GAIN, 1.0, gain)


def _shell(cls, *args, **kwargs):
    """`cls(*args, **kwargs)` with shapes in place of arrays: the importer replaces every
    array by the graph's values, so the initial weights need not be drawn (nor compiled)."""
    return eqx.filter_eval_shape(cls, *args, key=jr.key(0), **kwargs)


class _Importer:
    """Builds eqtrace layers from the groups of nodes of a chain."""

    def __init__(self, nir, nodes, dt, dtype, surrogate):
        self.nir, self.nodes = nir, nodes
        self.dt, self.dtype, self.surrogate = dt, dtype, surrogate

    def vector(self, name: str, field: str, size: int | None = None) -> np.ndarray:
        value = np.asarray(getattr(self.nodes[name], field), np.float64)
        if size is None:
            if value.ndim != 1:
                raise ValueError(
                    f"from_nir: node {name!r} ({_kind(self.nodes[name])}) has neurons of shape "
                    f"{value.shape}, but eqtrace's layers are vectors of neurons. Flatten the "
                    "layer before export."
                )
            return value
        return np.broadcast_to(value, (size,))

    def time_constant(self, name: str, field: str, size: int) -> np.ndarray:
        tau = self.vector(name, field, size)
        if not np.all((tau > 0) & (tau < math.inf)):
            raise ValueError(
                f"from_nir: node {name!r} has `{field}` = {tau}, but eqtrace's time constants "
                "must be positive and finite."
            )
        return tau

    def require_zero(self, name: str, field: str, size: int, why: str) -> None:
        if np.any(self.vector(name, field, size) != 0):
            raise ValueError(
                f"from_nir: node {name!r} ({_kind(self.nodes[name])}) has `{field}` = "
                f"{self.vector(name, field, size)}, but {why}"
            )

    def thresholds(self, name: str, field: str, size: int):
        """The per-neuron thresholds `θ`, eqtrace's one threshold `ϑ`, and the per-neuron factor
        `ϑ/θ_j` that rescales each membrane (and all it receives) to `ϑ`: NIR's thresholds may
        differ between neurons, and scaling a membrane changes none of its spikes."""
        theta = self.vector(name, field, size)
        if not np.all((theta > 0) & (theta < math.inf)):
            raise ValueError(
                f"from_nir: node {name!r} has `{field}` = {theta}, but eqtrace's thresholds "
                "must be positive and finite."
            )
        if _uniform(theta):
            return theta, float(theta[0]), np.ones(size)
        return theta, 1.0, 1 / theta

    def weights(self, name: str, size_in: int, previous: str) -> np.ndarray:
        """The weight matrix of a Linear or Affine node that receives `size_in` values."""
        node = self.nodes[name]
        weight = np.asarray(node.weight, np.float64)
        if weight.ndim != 2 or weight.shape[1] != size_in:
            raise ValueError(
                f"from_nir: node {name!r} ({_kind(node)}) has weights of shape {weight.shape}, "
                f"but receives {size_in} values from {previous!r}: expected shape (n, "
                f"{size_in}). Fix the weights or the edge."
            )
        return weight

    def dense(self, name: str | None, size_in: int, size: int, previous: str, neurons: str):
        """The weights and bias of a weight node before neurons, or the identity without one."""
        if name is None:
            if size_in != size:
                raise ValueError(
                    f"from_nir: node {neurons!r} has {size} neurons and receives the "
                    f"{size_in} outputs of {previous!r} directly. Put a Linear node of shape "
                    f"({size}, {size_in}) between them."
                )
            return np.eye(size), None
        node = self.nodes[name]
        weight = self.weights(name, size_in, previous)
        if weight.shape[0] != size:
            raise ValueError(
                f"from_nir: node {name!r} ({_kind(node)}) gives {weight.shape[0]} outputs, but "
                f"node {neurons!r} has {size} neurons. Make the weights' shape "
                f"({size}, {size_in})."
            )
        bias = np.asarray(node.bias, np.float64) if isinstance(node, self.nir.Affine) else None
        return weight, bias

    def loop_weights(self, loops: list[tuple], size: int) -> list[tuple]:
        """`(name, weight, bias)` of loop nodes that must be weights of shape `(size, size)`."""
        found = []
        for source, name, target in loops:
            node = self.nodes[name]
            if not isinstance(node, (self.nir.Linear, self.nir.Affine)):
                raise ValueError(
                    f"from_nir: the loop from {source!r} back to {target!r} passes through "
                    f"node {name!r}, a {_kind(node)}; eqtrace reads such a loop as recurrent "
                    "weights, a Linear or Affine node (or as the adaptation of an ALIF: an LI "
                    "from a Threshold back to itself)."
                )
            weight = np.asarray(node.weight, np.float64)
            if weight.shape != (size, size):
                raise ValueError(
                    f"from_nir: the recurrent weights {name!r} have shape {weight.shape}, but "
                    f"the loop joins {size} neurons: expected ({size}, {size})."
                )
            bias = np.asarray(node.bias, np.float64) if isinstance(node, self.nir.Affine) else 0.0
            found.append((name, weight, bias))
        return found

    def linear_op(self, weight: np.ndarray, bias: np.ndarray | None) -> Linear:
        op = _shell(
            Linear, weight.shape[1], weight.shape[0], use_bias=bias is not None, dtype=self.dtype
        )
        op = eqx.tree_at(lambda o: o.weight, op, jnp.asarray(weight, self.dtype))
        if bias is not None:
            op = eqx.tree_at(lambda o: o.bias, op, jnp.asarray(bias, self.dtype))
        return op

    def spiking_cell(self, cls, size_in, size, weights, recurrent, taus, **kwargs):
        """A LIF or ALIF with these weights and per-neuron time constants."""
        learn = not all(_uniform(tau) for tau in taus.values())
        cell = _shell(
            cls,
            size_in,
            size,
            recurrent=recurrent is not None,
            dt=self.dt,
            learn_tau=learn,
            surrogate=self.surrogate,
            dtype=self.dtype,
            **{field: float(tau[0]) for field, tau in taus.items()},
            **kwargs,
        )
        cell = eqx.tree_at(lambda c: c.input_op, cell, self.linear_op(*weights))
        if recurrent is not None:
            cell = eqx.tree_at(lambda c: c.recurrent_op, cell, self.linear_op(recurrent, None))
        if learn:
            for field, tau in taus.items():
                log_tau = jnp.asarray(np.log(tau), self.dtype)
                cell = eqx.tree_at(lambda c: getattr(c, f"log_{field}"), cell, log_tau)
        return cell

    def lif(self, dense, name, loops, size_in, previous):
        """A LIF or CubaLIF node (reset to zero) → `LIF(reset="zero")`."""
        synapse = isinstance(self.nodes[name], self.nir.CubaLIF)
        size = self.vector(name, "v_threshold").size
        self.require_zero(
            name,
            "v_reset",
            size,
            "eqtrace's LIF resets to zero (and starts at zero). Export the neurons with "
            "v_reset = 0.",
        )
        _, threshold, scale = self.thresholds(name, "v_threshold", size)
        taus = {"tau_mem": self.time_constant(name, "tau_mem" if synapse else "tau", size)}
        # v_t = α v + (1 − α)(v_leak + r I_t), with a synapse I_t = α_s I + (1 − α_s) w_in S_t:
        # `gain` takes the node's input S_t to eqtrace's u_t, `constant` is a bias.
        leak = _leak(self.dt, taus["tau_mem"])
        gain = leak * self.vector(name, "r", size)
        constant = leak * self.vector(name, "v_leak", size)
        if synapse:
            self.require_zero(name, "v_leak", size, _NO_CONSTANT_WITH_SYNAPSE)
            taus["tau_syn"] = self.time_constant(name, "tau_syn", size)
            gain = gain * _leak(self.dt, taus["tau_syn"]) * self.vector(name, "w_in", size)
        gain = _snap(gain)
        weight, bias = self.dense(dense, size_in, size, previous, name)
        bias = constant if bias is None else gain * bias + constant
        recurrent = None
        for _, w, b in self.loop_weights(loops, size):
            recurrent = gain[:, None] * w + (0 if recurrent is None else recurrent)
            bias = bias + gain * b
        return self.spiking_cell(
            LIF,
            size_in,
            size,
            ((scale * gain)[:, None] * weight, scale * bias if np.any(bias) else None),
            None if recurrent is None else scale[:, None] * recurrent,
            taus,
            synapse=synapse,
            reset="zero",
            threshold=threshold,
        )

    def subtracting(self, dense, names, loops, size_in, previous):
        """[LI (synapse) →] LI (membrane) → Threshold, with loops → `LIF(reset="subtract")`,
        or `ALIF` with an adaptation loop."""
        synapse, membrane, spike = names
        for source, name, target in loops:
            if source != spike:
                raise ValueError(
                    f"from_nir: the loop through {name!r} starts at {source!r}, but eqtrace "
                    f"reads loops in this layer only from its spikes, the Threshold {spike!r}."
                )
        size = self.vector(membrane, "tau").size
        theta, threshold, scale = self.thresholds(spike, "threshold", size)
        taus = {"tau_mem": self.time_constant(membrane, "tau", size)}
        leak = _leak(self.dt, taus["tau_mem"])
        gain_mem = _snap(leak * self.vector(membrane, "r", size))  # into the membrane
        gain, constant = gain_mem, leak * self.vector(membrane, "v_leak", size)  # into u_t
        if synapse is not None:
            self.require_zero(membrane, "v_leak", size, _NO_CONSTANT_WITH_SYNAPSE)
            taus["tau_syn"] = self.time_constant(synapse, "tau", size)
            leak_syn = _leak(self.dt, taus["tau_syn"])
            gain = _snap(gain_mem * leak_syn * self.vector(synapse, "r", size))
            constant = gain_mem * leak_syn * self.vector(synapse, "v_leak", size)
        weight, bias = self.dense(dense, size_in, size, previous, membrane)
        bias = constant if bias is None else gain * bias + constant
        into = {key: [loop for loop in loops if loop[2] == key] for key in names}
        membrane_loops = [
            (name, gain_mem[:, None] * w, gain_mem * b)
            for name, w, b in self.loop_weights(into[membrane], size)
        ]
        reset = -np.diag(theta)  # the reset by subtraction, in the membrane's units
        recurrent = None
        if synapse is not None:
            for _, w, b in self.loop_weights(into[synapse], size):
                recurrent = gain[:, None] * w + (0 if recurrent is None else recurrent)
                bias = bias + gain * b
            # Besides the synapse, the membrane takes only the reset −θ s.
            total = sum((w for _, w, _ in membrane_loops), np.zeros((size, size)))
            if not (
                membrane_loops
                and np.allclose(total, reset, rtol=_RESET_RTOL, atol=0)
                and all(np.all(b == 0) for *_, b in membrane_loops)
            ):
                raise ValueError(
                    f"from_nir: the loops from {spike!r} into the membrane {membrane!r} are "
                    "not the reset by subtraction (−threshold on the diagonal, no bias), but "
                    "with a synapse eqtrace takes recurrent weights only through the synapse "
                    f"{synapse!r}. Send the recurrent weights to the synapse node."
                )
        else:
            # One loop of exactly −θ I is the reset; otherwise the loops together are the
            # reset plus recurrent weights, W_rec = Σ loops + θ I.
            exact = [
                loop
                for loop in membrane_loops
                if isinstance(self.nodes[loop[0]], self.nir.Linear)
                and np.array_equal(loop[1], reset)
            ][:1]
            for _, w, b in [loop for loop in membrane_loops if loop not in exact]:
                recurrent = w + (0 if recurrent is None else recurrent)
                bias = bias + b
            if not exact:
                recurrent = -reset + (0 if recurrent is None else recurrent)
                recurrent = recurrent if np.any(recurrent) else None
        weights = ((scale * gain)[:, None] * weight, scale * bias if np.any(bias) else None)
        recurrent = None if recurrent is None else scale[:, None] * recurrent
        kwargs = dict(synapse=synapse is not None, reset="subtract", threshold=threshold)
        adaptation = self.adaptation(into[spike], spike)
        if adaptation is None:
            return self.spiking_cell(LIF, size_in, size, weights, recurrent, taus, **kwargs)
        taus["tau_adapt"] = self.time_constant(adaptation, "tau", size)
        self.require_zero(adaptation, "v_leak", size, "the adaptation of ALIF decays to zero.")
        # â_t = ρ â + (1 − ρ) r s: the Threshold sees v + â = v − β a, β = −(1 − ρ) r.
        beta = -scale * _leak(self.dt, taus["tau_adapt"]) * self.vector(adaptation, "r", size)
        # A per-neuron β may be negative (as learn_beta=True can train it); a static one not.
        static = _uniform(beta) and beta[0] >= 0
        cell = self.spiking_cell(
            ALIF,
            size_in,
            size,
            weights,
            recurrent,
            taus,
            beta=float(beta[0]) if static else 0.0,
            learn_beta=not static,
            **kwargs,
        )
        if static:
            return cell
        return eqx.tree_at(lambda c: c.beta_per_neuron, cell, jnp.asarray(beta, self.dtype))

    def adaptation(self, loops: list[tuple], spike: str) -> str | None:
        """The LI node of the one loop from a Threshold back to itself: ALIF's adaptation."""
        if not loops:
            return None
        if len(loops) > 1 or not isinstance(self.nodes[loops[0][1]], self.nir.LI):
            found = ", ".join(f"{name!r} ({_kind(self.nodes[name])})" for _, name, _ in loops)
            raise ValueError(
                f"from_nir: the Threshold {spike!r} receives the loops through {found}, but "
                "eqtrace reads a loop into a Threshold only as the adaptation of an ALIF: a "
                "single LI node from the Threshold back to itself."
            )
        return loops[0][1]

    def readout(self, dense, name, size_in, previous):
        """An LI not followed by a Threshold → `LeakyReadout`."""
        size = self.vector(name, "tau").size
        tau = self.time_constant(name, "tau", size)
        if not _uniform(tau):
            raise ValueError(
                f"from_nir: the LI node {name!r} is read as a LeakyReadout, which has one time "
                f"constant, but its `tau` differs between neurons ({tau.tolist()}). Give it one "
                "time constant."
            )
        weight, bias = self.dense(dense, size_in, size, previous, name)
        r = self.vector(name, "r", size)
        bias = self.vector(name, "v_leak", size) + (0.0 if bias is None else r * bias)
        readout = _shell(
            LeakyReadout, size_in, size, tau=float(tau[0]), dt=self.dt, dtype=self.dtype
        )
        op = self.linear_op(r[:, None] * weight, bias)
        return eqx.tree_at(lambda layer: layer.input_op, readout, op)

    def linear(self, name, size_in, previous):
        """A Linear or Affine node between layers → `eqx.nn.Linear`."""
        node = self.nodes[name]
        weight = self.weights(name, size_in, previous)
        affine = isinstance(node, self.nir.Affine)
        layer = _shell(eqx.nn.Linear, size_in, weight.shape[0], use_bias=affine, dtype=self.dtype)
        layer = eqx.tree_at(lambda layer: layer.weight, layer, jnp.asarray(weight, self.dtype))
        if affine:
            bias = jnp.asarray(node.bias, self.dtype)
            layer = eqx.tree_at(lambda layer: layer.bias, layer, bias)
        return layer


def _size_of(layer: Any) -> int:
    if isinstance(layer, eqx.nn.Linear):
        return layer.weight.shape[0]
    return layer.hidden_size


def _import_chain(importer: _Importer, path: list[str], loops: list[tuple]) -> list[Any]:
    nir, nodes = importer.nir, importer.nodes
    shape = np.asarray(nodes[path[0]].input_type["input"]).reshape(-1)
    if shape.size != 1:
        raise ValueError(
            f"from_nir: the Input node {path[0]!r} has shape {shape.tolist()}, but eqtrace's "
            "layers take a vector. Flatten the input before export."
        )
    size, names, layers = int(shape[0]), path[1:-1], []
    weights, neurons = (nir.Linear, nir.Affine), (nir.LIF, nir.CubaLIF, nir.LI)

    def node(i: int) -> Any:
        return nodes[names[i]] if i < len(names) else None

    i, claimed = 0, set()
    while i < len(names):
        previous = path[i]  # the node before names[i] on the path
        dense = None
        if isinstance(node(i), weights) and isinstance(node(i + 1), neurons):
            dense, i = names[i], i + 1  # the input weights of the neurons that follow
        start, current = i, node(i)
        if isinstance(current, weights):
            layers.append(importer.linear(names[i], size, previous))
            i += 1
        elif isinstance(current, (nir.LIF, nir.CubaLIF)):
            i += 1
        elif isinstance(current, nir.LI):
            if isinstance(node(i + 1), nir.Threshold):
                i += 2
            elif isinstance(node(i + 1), nir.LI) and isinstance(node(i + 2), nir.Threshold):
                i += 3
            else:
                layers.append(importer.readout(dense, names[i], size, previous))
                i += 1
        elif isinstance(current, nir.Threshold):
            raise ValueError(
                f"from_nir: the Threshold node {names[i]!r} follows {path[i]!r} "
                f"({_kind(nodes[path[i]])}), but eqtrace reads a Threshold only as the spikes "
                "of a membrane: an LI node (after an optional synaptic LI) right before it."
            )
        else:
            raise _unsupported(names[i], current, nir)
        group = names[start:i]
        inside = [loop for loop in loops if loop[0] in group or loop[2] in group]
        claimed.update(loop[1] for loop in inside)
        for source, name, target in inside:
            if source not in group or target not in group:
                raise ValueError(
                    f"from_nir: the loop through {name!r} goes from {source!r} back to "
                    f"{target!r}, another layer; eqtrace imports loops only from a layer's "
                    "neurons back to the same layer, not feedback between layers."
                )
        if isinstance(current, (nir.LIF, nir.CubaLIF)):
            layers.append(importer.lif(dense, group[0], inside, size, previous))
        elif isinstance(current, nir.LI) and len(group) > 1:
            names3 = (None, *group) if len(group) == 2 else tuple(group)
            layers.append(importer.subtracting(dense, names3, inside, size, previous))
        elif inside:
            raise ValueError(
                f"from_nir: node {group[0]!r} ({_kind(current)}) has a loop through "
                f"{inside[0][1]!r}, but eqtrace imports loops only around spiking neurons."
            )
        size = _size_of(layers[-1])
    for source, name, target in loops:
        if name not in claimed:
            raise ValueError(
                f"from_nir: the loop through {name!r} goes from {source!r} back to {target!r}, "
                "which are not the neurons of a layer; eqtrace imports loops only around "
                "spiking neurons (recurrent weights, resets, adaptation)."
            )
    shape = nodes[path[-1]].output_type.get("output")
    if shape is not None and np.asarray(shape).reshape(-1).tolist() != [size]:
        raise ValueError(
            f"from_nir: the Output node {path[-1]!r} has shape "
            f"{np.asarray(shape).reshape(-1).tolist()}, but the last layer gives {size} values."
        )
    return layers


def from_nir(
    graph: "nir.NIRGraph | str | os.PathLike[str]",
    *,
    dt: float = 1.0,
    dtype: Any = None,
    surrogate: AbstractSurrogate = FastSigmoid(),
) -> Sequential:
    """Imports a NIR graph (the Neuromorphic Intermediate Representation) as an eqtrace
    network whose outputs equal the graph's, step by step.

    The graph must be a chain from one `Input` to one `Output` node, with loops only from a
    layer's spikes back to the same layer, made of these patterns (those that
    [`eqtrace.to_nir`][] writes):

    - [`Linear` or `Affine` →] `LIF` or `CubaLIF`: `LIF(reset="zero")`, with a synapse for
      `CubaLIF`.
    - [`Linear` or `Affine` →] [`LI` (synapse) →] `LI` (membrane) → `Threshold`, with a loop
      of weights `−θ I` from the `Threshold` to the membrane: `LIF(reset="subtract")`; with an
      `LI` from the `Threshold` back to itself as well: `ALIF(reset="subtract")`.
    - A `Linear` or `Affine` node from the spikes back to the neurons: recurrent weights.
    - [`Linear` or `Affine` →] `LI` not followed by a `Threshold`: `LeakyReadout`.
    - Any other `Linear` or `Affine` node: `eqx.nn.Linear`.

    Nested subgraphs are inlined. The graph is read with the discretisation that
    [`eqtrace.to_nir`][] writes: each state is integrated exactly over a step of `dt` with
    its input held constant during the step, the synaptic current before the membrane, all
    states start at zero, and a loop carries the previous step's value. NIR's `r`, `w_in`,
    `v_leak` and per-neuron thresholds are folded into weights and biases; per-neuron time
    constants give cells with `learn_tau=True`. Masks are not recovered (masked weights are
    zeros). Graphs written by tools that discretise with forward Euler (snnTorch, Norse) are
    read the same way, which matches them only when `dt` is much smaller than the time
    constants. Other nodes and structures (`IF`, `Delay`, `Conv2d`, a non-zero `v_reset`,
    branches) are refused with a `TypeError` or `ValueError` naming the node.

    **Arguments:**

    - `graph`: a `nir.NIRGraph`, or the path of a `.nir` file (read with `nir.read`).
    - `dt`: the time step, in the time unit of the graph's time constants. The cells get this
      `dt` and the graph's time constants as they are.
    - `dtype`: the parameter dtype (JAX's default float if `None`).
    - `surrogate`: the surrogate spike function of the spiking cells (NIR records only the
      forward Heaviside step), an [`eqtrace.nn.surrogate.AbstractSurrogate`][].

    **Returns:**

    An `eqtrace.nn.Sequential` of the layers, ready to run or to train further.
    """
    nir = _nir_module()
    if isinstance(graph, (str, os.PathLike)):
        graph = nir.read(graph)
    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(
            f"from_nir: `graph` must be a nir.NIRGraph or the path of a .nir file, but "
            f"received {type(graph).__name__}. Read a file with nir.read(path)."
        )
    if not 0 < dt < math.inf:
        raise ValueError(f"from_nir: `dt` must be a positive float, but received {dt}.")
    dtype = jnp.result_type(float) if dtype is None else dtype
    nodes, edges = _inline_subgraphs(nir, graph)
    path, loops = _chain(nir, nodes, edges)
    layers = _import_chain(_Importer(nir, nodes, float(dt), dtype, surrogate), path, loops)
    # Every array came from the graph (an unset one would be a shape, not an array).
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jtu.tree_leaves(layers))
    if not any(isinstance(layer, AbstractCell) for layer in layers):
        raise ValueError(
            "from_nir: the graph has no neurons (LIF, CubaLIF or LI nodes), only weights; "
            "eqtrace imports spiking networks. Use the weights directly."
        )
    return Sequential(layers)
