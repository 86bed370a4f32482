"""NIR export and import (`eqtrace.to_nir`, `eqtrace.from_nir`).

Two oracles: the round trip (export, write, read, import: the same outputs and spikes as the
original network), and `simulate`, a NumPy reading of NIR graphs written here from NIR's
equations and the discretisation of docs/nir.md, independently of the code under test. Every
exported network is also run through `simulate` (a NIR consumer reproduces eqtrace), and
hand-written graphs are imported and checked against it.
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqtrace
from eqtrace import nn


nir = pytest.importorskip("nir")

STEPS = 50


def simulate(graph, xs: np.ndarray, dt: float) -> np.ndarray:
    """Runs a (flat) NIR graph in NumPy. Each node's state is integrated exactly over the step
    with its summed input `I` held constant, `v ← e v + (1 − e)(v_leak + r I)` with
    `e = exp(−dt/τ)` (a CubaLIF's current first, its membrane then with the new current);
    nodes run in the order of a depth-first walk from the input, and an edge back to a node
    still being walked (one that closes a cycle) carries the previous step's value. States
    start at zero, spikes too: before the first step a loop carries what its nodes make of
    no spikes (an Affine's bias)."""
    nodes, edges = graph.nodes, graph.edges
    (source,) = [k for k, node in nodes.items() if isinstance(node, nir.Input)]
    (sink,) = [k for k, node in nodes.items() if isinstance(node, nir.Output)]
    order, delayed, status = [], set(), {}

    def walk(key):
        status[key] = "open"
        for a, b in edges:
            if a == key and status.get(b) == "open":
                delayed.add((a, b))
            elif a == key and b not in status:
                walk(b)
        order.append(key)
        status[key] = "done"

    walk(source)
    order.reverse()
    states = {key: {} for key in nodes}
    out = {key: node.bias if isinstance(node, nir.Affine) else 0.0 for key, node in nodes.items()}
    ys = []
    for x in xs:
        last = dict(out)
        for key in order:
            if key == source:
                out[key] = x
                continue
            inputs = [last[a] if (a, b) in delayed else out[a] for a, b in edges if b == key]
            out[key] = _node_step(nodes[key], sum(inputs), states[key], dt)
        ys.append(out[sink])
    return np.stack(ys)


def _node_step(node, i, state: dict, dt: float):
    if isinstance(node, nir.Output):
        return i
    if isinstance(node, nir.Affine):
        return node.weight @ i + node.bias
    if isinstance(node, nir.Linear):
        return node.weight @ i
    if isinstance(node, nir.Threshold):
        return (i > node.threshold).astype(float)
    if isinstance(node, nir.LI):
        e = np.exp(-dt / node.tau)
        state["v"] = e * state.get("v", 0.0) + (1 - e) * (node.v_leak + node.r * i)
        return state["v"]
    if isinstance(node, nir.CubaLIF):
        e_syn = np.exp(-dt / node.tau_syn)
        state["i"] = e_syn * state.get("i", 0.0) + (1 - e_syn) * node.w_in * i
        i, tau = state["i"], node.tau_mem
    else:
        assert isinstance(node, nir.LIF), node
        tau = node.tau
    e = np.exp(-dt / tau)
    v = e * state.get("v", 0.0) + (1 - e) * (node.v_leak + node.r * i)
    z = v > node.v_threshold
    state["v"] = np.where(z, node.v_reset, v)
    return z.astype(float)


@eqx.filter_jit
def run(model, xs):
    """The outputs, and the spikes of every spiking layer, over the sequence `xs`."""

    def step(state, x):
        state, y = model(state, x)
        spiking = [(layer, s) for layer, s in zip(model.layers, state) if hasattr(layer, "reset")]
        return state, (y, [layer.output(s) for layer, s in spiking])

    return jax.lax.scan(step, model.init_state(), xs)[1]


def spike_trains(rng, size: int, dtype=np.float64) -> np.ndarray:
    return (rng.uniform(size=(STEPS, size)) < 0.3).astype(dtype)


def louder(cell, factor: float):
    """`cell` with input weights `factor` times larger (so that the neurons fire)."""
    return eqx.tree_at(lambda c: c.input_op.weight, cell, cell.input_op.weight * factor)


def _uniform(rng, cell, field, low, high, log=False):
    """`cell` with the per-neuron parameter `field` drawn uniformly (NumPy: `jr` would compile
    once per shape)."""
    value = rng.uniform(low, high, getattr(cell, field).shape)
    return eqx.tree_at(
        lambda c: getattr(c, field), cell, jnp.asarray(np.log(value) if log else value)
    )


def _learned_taus(key, rng):
    cell = nn.LIF(3, 6, synapse=True, recurrent=True, learn_tau=True, key=key)
    cell = _uniform(rng, cell, "log_tau_mem", 5.0, 40.0, log=True)
    return nn.Sequential([louder(_uniform(rng, cell, "log_tau_syn", 2.0, 10.0, log=True), 3)])


def _masks(key, rng):
    input_mask = jnp.asarray(rng.uniform(size=(6, 3)) < 0.6)
    recurrent_mask = jnp.asarray(rng.uniform(size=(6, 6)) < 0.5)
    cell = nn.LIF(
        3, 6, recurrent=True, input_mask=input_mask, recurrent_mask=recurrent_mask, key=key
    )
    # Values under the mask, which must not reach the graph.
    weight = jnp.where(input_mask, cell.input_op.weight * 3, 5.0)
    return nn.Sequential([eqx.tree_at(lambda c: c.input_op.weight, cell, weight)])


def _stack(key, rng, dtype=None):
    keys = jr.split(key, 3)
    return nn.Sequential(
        [
            louder(nn.LIF(3, 8, threshold=0.5, dtype=dtype, key=keys[0]), 2),
            nn.LIF(8, 6, recurrent=True, reset="zero", threshold=0.5, dtype=dtype, key=keys[1]),
            nn.LeakyReadout(6, 2, tau=10.0, dtype=dtype, key=keys[2]),
        ]
    )


def _alif(key, rng):
    cell = nn.ALIF(3, 6, recurrent=True, synapse=True, learn_tau=True, learn_beta=True, key=key)
    cell = _uniform(rng, cell, "log_tau_mem", 5.0, 40.0, log=True)
    cell = _uniform(rng, cell, "log_tau_adapt", 50.0, 300.0, log=True)
    cell = _uniform(rng, cell, "beta_per_neuron", 0.2, 1.0)
    return nn.Sequential([louder(cell, 4), eqx.nn.Linear(6, 2, key=key)])


#: name -> (model from a key, the NIR node kinds the export must contain)
CASES = {
    "lif": (
        lambda k, _: nn.Sequential([louder(nn.LIF(3, 6, reset="zero", key=k), 3)]),
        {"LIF"},
    ),
    # τ = 25: 1/(1 − α) · (1 − α) is not 1 in float64, the reset loop must still be found.
    "lif_subtract": (
        lambda k, _: nn.Sequential([louder(nn.LIF(3, 6, tau_mem=25.0, key=k), 3)]),
        {"LI", "Threshold"},
    ),
    "recurrent_synapse": (
        lambda k, _: nn.Sequential(
            [louder(nn.LIF(3, 6, recurrent=True, synapse=True, reset="zero", key=k), 3)]
        ),
        {"CubaLIF"},
    ),
    "recurrent_synapse_subtract": (
        lambda k, _: nn.Sequential([louder(nn.LIF(3, 6, recurrent=True, synapse=True, key=k), 3)]),
        {"LI", "Threshold"},
    ),
    "learned_taus": (_learned_taus, {"LI", "Threshold"}),
    "masks": (_masks, {"LI", "Threshold"}),
    "stack": (_stack, {"LIF", "LI", "Threshold", "Affine"}),
    "alif": (_alif, {"LI", "Threshold", "Affine"}),
    "lif_then_linear": (
        lambda k, _: nn.Sequential(
            [louder(nn.LIF(3, 6, key=k), 3), eqx.nn.Linear(6, 2, use_bias=False, key=k)]
        ),
        {"LI", "Threshold", "Linear"},
    ),
}


def _structure(model):
    return [
        (type(layer), getattr(layer, "reset", None), getattr(layer, "synapse", None))
        + (getattr(layer, "recurrent_op", None) is None,)
        for layer in model.layers
    ]


def _check_same(imported, original, xs):
    assert _structure(imported) == _structure(original)
    (y, spikes), (y_back, spikes_back) = run(original, xs), run(imported, xs)
    assert len(spikes) == len(spikes_back) > 0
    for s, s_back in zip(spikes, spikes_back):
        assert 0.02 < float(jnp.mean(s)) < 0.98, "the test needs neurons that fire, not all"
        np.testing.assert_array_equal(s_back, s)
    assert y_back.dtype == y.dtype
    np.testing.assert_allclose(y_back, y, rtol=1e-12, atol=1e-12)
    return y


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_and_nir_reading(name, getkey, rng, tmp_path):
    make, kinds = CASES[name]
    model = make(getkey(), rng)
    xs = spike_trains(rng, 3)
    graph = eqtrace.to_nir(model)
    assert kinds <= {type(node).__name__ for node in graph.nodes.values()}
    nir.write(tmp_path / "model.nir", graph)
    imported = eqtrace.from_nir(tmp_path / "model.nir", dt=1.0)
    y = _check_same(imported, model, xs)
    # A NIR consumer that integrates the equations as documented reproduces eqtrace.
    np.testing.assert_allclose(simulate(graph, xs, dt=1.0), y, rtol=1e-9, atol=1e-9)


def test_per_neuron_exports(getkey, rng):
    """Learnt time constants are exported per neuron, masked weights as zeros."""
    model = _learned_taus(getkey(), rng)
    graph = eqtrace.to_nir(model)
    cell = model.layers[0]
    np.testing.assert_allclose(graph.nodes["layer0.membrane"].tau, np.exp(cell.log_tau_mem))
    np.testing.assert_allclose(graph.nodes["layer0.synapse"].tau, np.exp(cell.log_tau_syn))
    assert np.unique(graph.nodes["layer0.membrane"].tau).size == 6

    cell = _masks(getkey(), rng).layers[0]
    graph = eqtrace.to_nir(cell)
    for node, op in [("input_weight", cell.input_op), ("recurrent_weight", cell.recurrent_op)]:
        weight = graph.nodes[f"layer0.{node}"].weight
        np.testing.assert_array_equal(weight == 0, ~np.asarray(op.mask) | (op.weight == 0))
        np.testing.assert_array_equal(weight[op.mask], op.weight[op.mask])


def test_float32_and_another_time_unit(getkey, rng):
    """A float32 network written in seconds (`dt=1e-3` for steps of 1 ms) and read back."""
    model = _stack(getkey(), rng, dtype=jnp.float32)
    xs = spike_trains(rng, 3, np.float32)
    graph = eqtrace.to_nir(model, dt=1e-3)
    assert graph.nodes["layer0.membrane"].tau[0] == pytest.approx(0.02)
    imported = eqtrace.from_nir(graph, dt=1e-3, dtype=jnp.float32)
    assert imported.layers[0].dt == 1e-3 and imported.layers[0].tau_mem == pytest.approx(0.02)
    (y, spikes), (y_back, spikes_back) = run(model, xs), run(imported, xs)
    assert y_back.dtype == jnp.float32
    for s, s_back in zip(spikes, spikes_back):
        np.testing.assert_array_equal(s_back, s)
    np.testing.assert_allclose(y_back, y, rtol=1e-6, atol=1e-6)


def _hand_written_cuba(rng):
    """Input(4) → Affine → CubaLIF (every parameter per neuron, a recurrent Affine) → Linear
    → LIF (v_leak ≠ 0) → Affine → LI (r ≠ 1, v_leak ≠ 0) → Output."""
    u = rng.uniform
    return nir.NIRGraph(
        nodes={
            "in": nir.Input(input_type={"input": np.array([4])}),
            "w1": nir.Affine(weight=u(-1, 2, (5, 4)), bias=u(-0.2, 0.2, 5)),
            "cuba": nir.CubaLIF(
                tau_syn=u(2, 8, 5),
                tau_mem=u(10, 30, 5),
                r=u(5, 30, 5),
                v_leak=np.zeros(5),
                v_threshold=u(0.5, 1.5, 5),
                v_reset=np.zeros(5),
                w_in=u(1, 5, 5),
            ),
            "rec": nir.Affine(weight=u(-0.5, 0.5, (5, 5)), bias=u(-0.1, 0.1, 5)),
            "w2": nir.Linear(weight=u(-0.5, 1.5, (3, 5))),
            "lif": nir.LIF(
                tau=np.full(3, 10.0),
                r=np.full(3, 8.0),
                v_leak=u(0, 0.3, 3),
                v_threshold=np.full(3, 0.8),
                v_reset=np.zeros(3),
            ),
            "w3": nir.Affine(weight=u(-1, 1, (2, 3)), bias=u(-0.1, 0.1, 2)),
            "li": nir.LI(tau=np.full(2, 15.0), r=u(1, 3, 2), v_leak=u(-0.1, 0.1, 2)),
            "out": nir.Output(output_type={"output": np.array([2])}),
        },
        edges=[
            ("in", "w1"),
            ("w1", "cuba"),
            ("cuba", "rec"),
            ("rec", "cuba"),
            ("cuba", "w2"),
            ("w2", "lif"),
            ("lif", "w3"),
            ("w3", "li"),
            ("li", "out"),
        ],
    )


def _hand_written_adaptive(rng):
    """Input(3) → Affine → LI (membrane, per-neuron τ, r and v_leak) → Threshold (per-neuron
    thresholds), with an arbitrary Linear loop into the membrane (a reset by subtraction
    plus recurrent weights) and an LI loop into the Threshold (adaptation, which lowers the
    threshold of some neurons) → Linear → Output."""
    u = rng.uniform
    theta = u(0.5, 1.5, 4)
    return nir.NIRGraph(
        nodes={
            "in": nir.Input(input_type={"input": np.array([3])}),
            "w": nir.Affine(weight=u(-1, 2, (4, 3)), bias=u(-0.1, 0.1, 4)),
            "mem": nir.LI(tau=u(10, 30, 4), r=u(5, 20, 4), v_leak=u(0, 0.2, 4)),
            "spike": nir.Threshold(threshold=theta),
            "loop": nir.Linear(weight=u(-0.05, 0.05, (4, 4)) - np.diag(theta / 10)),
            "adapt": nir.LI(tau=u(50, 200, 4), r=u(-50, 10, 4), v_leak=np.zeros(4)),
            "read": nir.Linear(weight=u(-1, 1, (2, 4))),
            "out": nir.Output(output_type={"output": np.array([2])}),
        },
        edges=[
            ("in", "w"),
            ("w", "mem"),
            ("mem", "spike"),
            ("spike", "loop"),
            ("loop", "mem"),
            ("spike", "adapt"),
            ("adapt", "spike"),
            ("spike", "read"),
            ("read", "out"),
        ],
    )


@pytest.mark.parametrize("make", [_hand_written_cuba, _hand_written_adaptive])
def test_import_matches_the_nir_equations(make, rng):
    graph = make(rng)
    size = int(graph.nodes["in"].input_type["input"][0])
    xs = spike_trains(rng, size)
    model = eqtrace.from_nir(graph, dt=0.5)
    y, spikes = run(model, xs)
    for s in spikes:
        assert 0.02 < float(jnp.mean(s)) < 0.98, "the test needs neurons that fire, not all"
    np.testing.assert_allclose(y, simulate(graph, xs, dt=0.5), rtol=1e-9, atol=1e-9)


def test_nested_subgraphs_are_inlined(rng):
    """A recurrent layer written as a subgraph (as snnTorch does) reads as the flat graph."""
    flat = _hand_written_cuba(rng)
    layer = nir.NIRGraph(
        nodes={
            "input": nir.Input(input_type={"input": np.array([5])}),
            "cuba": flat.nodes["cuba"],
            "rec": flat.nodes["rec"],
            "output": nir.Output(output_type={"output": np.array([5])}),
        },
        edges=[("input", "cuba"), ("cuba", "rec"), ("rec", "cuba"), ("cuba", "output")],
    )
    nodes = {k: v for k, v in flat.nodes.items() if k not in ("cuba", "rec")} | {"rnn": layer}
    edges = [("in", "w1"), ("w1", "rnn"), ("rnn", "w2")] + [
        e for e in flat.edges if e[0] in ("w2", "lif", "w3", "li")
    ]
    nested = nir.NIRGraph(nodes=nodes, edges=edges)
    xs = spike_trains(rng, 4)
    y, _ = run(eqtrace.from_nir(nested), xs)
    np.testing.assert_allclose(y, simulate(flat, xs, dt=1.0), rtol=1e-9, atol=1e-9)


# Refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, error, match",
    [
        (
            lambda k: [nn.ALIF(3, 4, reset="zero", key=k)],
            ValueError,
            r'layer 0 \(ALIF\) has reset="zero".*reset="subtract"',
        ),
        (
            lambda k: [nn.LIF(3, 4, key=k), jax.nn.relu],
            TypeError,
            r"layer 1 \(function relu\) has no NIR counterpart.*stateless function",
        ),
        (
            lambda k: [nn.DelayLine(3, 2)],
            TypeError,
            r"layer 0 \(DelayLine\) has no NIR counterpart.*other cell",
        ),
        (
            lambda k: [nn.LIF(3, 4, key=k), eqx.nn.Linear(5, 2, key=k)],
            ValueError,
            r"layer 1 \(Linear\) takes 5 inputs, but layer 0 \(LIF\) gives 4 outputs",
        ),
        (
            lambda k: [nn.LIF(3, 4, key=k), nn.LeakyReadout(4, 2, dt=0.5, key=k)],
            ValueError,
            r"different time steps dt = \[0.5, 1.0\].*Pass `dt`",
        ),
        (
            lambda k: [nn.LIF(3, 4, key=k), eqx.nn.Linear(4, "scalar", key=k)],
            ValueError,
            r'layer 1 is an eqx.nn.Linear with in_features or out_features "scalar"',
        ),
    ],
    ids=["alif_zero_reset", "function", "rate_cell", "sizes", "time_steps", "scalar_linear"],
)
def test_to_nir_refuses(layers, error, match, getkey):
    with pytest.raises(error, match=match):
        eqtrace.to_nir(nn.Sequential(layers(getkey())))


def test_a_time_step_makes_different_steps_exportable(getkey):
    model = nn.Sequential([nn.LIF(3, 4, key=getkey()), nn.LeakyReadout(4, 2, dt=0.5, key=getkey())])
    graph = eqtrace.to_nir(model, dt=1.0)
    # The read-out's decay per step exp(−0.5/20) is kept: τ = 20 · 1.0/0.5.
    np.testing.assert_allclose(graph.nodes["layer1.readout"].tau, 40.0)


def _chain(*nodes, loops=(), type_check=True):
    """Input(3) → nodes → Output, and `loops` as extra `(name, node, from, to)`."""
    names = ["in"] + [f"n{i}" for i in range(len(nodes))] + ["out"]
    size = nodes[-1].output_type["output"]
    all_nodes = dict(zip(names, [nir.Input(input_type={"input": np.array([3])}), *nodes]))
    all_nodes["out"] = nir.Output(output_type={"output": np.array(size)})
    edges = list(zip(names, names[1:]))
    for name, node, source, target in loops:
        all_nodes[name] = node
        edges += [(source, name), (name, target)]
    return nir.NIRGraph(nodes=all_nodes, edges=edges, type_check=type_check)


def _lif(n=3, **changes):
    params = (
        dict(tau=np.full(n, 10.0), r=np.ones(n), v_leak=np.zeros(n), v_threshold=np.ones(n))
        | changes
    )
    return nir.LIF(**params)


def _cuba(n=3, **changes):
    params = dict(
        tau_syn=np.full(n, 5.0),
        tau_mem=np.full(n, 10.0),
        r=np.ones(n),
        v_leak=np.zeros(n),
        v_threshold=np.ones(n),
    )
    return nir.CubaLIF(**(params | changes))


def _li(n=3, **changes):
    return nir.LI(**(dict(tau=np.full(n, 10.0), r=np.ones(n), v_leak=np.zeros(n)) | changes))


def _branching():
    nodes = {
        "in": nir.Input(input_type={"input": np.array([3])}),
        "a": _lif(),
        "b": _lif(),
        "out": nir.Output(output_type={"output": np.array([3])}),
    }
    edges = [("in", "a"), ("in", "b"), ("a", "out"), ("b", "out")]
    return nir.NIRGraph(nodes=nodes, edges=edges)


def _two_inputs():
    nodes = {
        "in": nir.Input(input_type={"input": np.array([3])}),
        "in2": nir.Input(input_type={"input": np.array([3])}),
        "a": _lif(),
        "out": nir.Output(output_type={"output": np.array([3])}),
    }
    return nir.NIRGraph(nodes=nodes, edges=[("in", "a"), ("in2", "a"), ("a", "out")])


EYE = nir.Linear(weight=np.eye(3))
REFUSED_GRAPHS = {
    "if_node": (
        lambda: _chain(nir.IF(r=np.ones(3), v_threshold=np.ones(3))),
        TypeError,
        r"node 'n0' is a nir.IF, which eqtrace cannot import.*without leak",
    ),
    "delay_node": (
        lambda: _chain(nir.Delay(delay=np.ones(3)), _lif()),
        TypeError,
        r"node 'n0' is a nir.Delay, which eqtrace cannot import",
    ),
    "branches": (_branching, ValueError, r"node 'in' feeds \['a', 'b'\].*branches"),
    "two_inputs": (_two_inputs, ValueError, r"2 Input node\(s\).*one input and one output"),
    "reset_potential": (
        lambda: _chain(_lif(v_reset=np.full(3, -0.5))),
        ValueError,
        r"node 'n0' \(nir.LIF\) has `v_reset`.*resets to zero",
    ),
    "leak_with_synapse": (
        lambda: _chain(_cuba(v_leak=np.full(3, 0.1))),
        ValueError,
        r"node 'n0' \(nir.CubaLIF\) has `v_leak`.*passes through the synapse",
    ),
    "readout_time_constants": (
        lambda: _chain(_lif(), _li(tau=np.array([5.0, 10.0, 20.0]))),
        ValueError,
        r"LI node 'n1' is read as a LeakyReadout, which has one time constant",
    ),
    "weights_of_wrong_shape": (
        lambda: _chain(nir.Linear(weight=np.ones((3, 4))), _lif(), type_check=False),
        ValueError,
        r"node 'n0' \(nir.Linear\) has weights of shape \(3, 4\), but receives 3 values",
    ),
    "loop_between_layers": (
        lambda: _chain(_lif(), EYE, _lif(), loops=[("back", EYE, "n2", "n0")]),
        ValueError,
        r"loop through 'back' goes from 'n2' back to 'n0', another layer",
    ),
    "threshold_alone": (
        lambda: _chain(EYE, nir.Threshold(threshold=np.ones(3))),
        ValueError,
        r"Threshold node 'n1' follows 'n0' \(nir.Linear\).*an LI node",
    ),
    "recurrence_into_membrane_with_synapse": (
        lambda: _chain(
            _li(),
            _li(),
            nir.Threshold(threshold=np.ones(3)),
            loops=[("rec", nir.Linear(weight=np.ones((3, 3))), "n2", "n1")],
        ),
        ValueError,
        r"loops from 'n2' into the membrane 'n1' are not the reset by subtraction",
    ),
    "linear_loop_into_threshold": (
        lambda: _chain(
            _li(),
            nir.Threshold(threshold=np.ones(3)),
            loops=[("w", EYE, "n1", "n1")],
        ),
        ValueError,
        r"Threshold 'n1' receives the loops through 'w' \(nir.Linear\), but .* adaptation",
    ),
    "loop_around_weights": (
        lambda: _chain(EYE, _lif(), loops=[("w", EYE, "n0", "n0")]),
        ValueError,
        r"loop through 'w' goes from 'n0' back to 'n0', which are not the neurons of a layer",
    ),
    "unknown_node": (
        lambda: nir.NIRGraph(
            nodes={"in": nir.Input(input_type={"input": np.array([3])}), "a": _lif()},
            edges=[("in", "a"), ("a", "out")],
            type_check=False,
        ),
        ValueError,
        r"the edge \('a', 'out'\) names a node the graph does not have",
    ),
    "no_neurons": (
        lambda: _chain(nir.Affine(weight=np.ones((2, 3)), bias=np.zeros(2))),
        ValueError,
        r"the graph has no neurons",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED_GRAPHS))
def test_from_nir_refuses(name):
    make, error, match = REFUSED_GRAPHS[name]
    with pytest.raises(error, match=match):
        eqtrace.from_nir(make())


def test_nir_is_optional(monkeypatch):
    assert "nir" not in vars(eqtrace._nir)  # `import eqtrace` does not import nir
    monkeypatch.setitem(sys.modules, "nir", None)  # `import nir` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "eqtrace\[nir\]"'):
        eqtrace.to_nir(nn.LIF(3, 4, key=jr.key(0)))
