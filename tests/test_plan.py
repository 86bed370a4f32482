"""The prepared plan (`eqtrace.prepare`): per layer the configured rule holding its structure,
the trace layout and its neuron axes; `init_trace`, the steps, `check` and `trace_size` read
it, and the steps never analyse a cell themselves."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import eqtrace
from helpers import LONG, Rolling


def _network():
    key = jr.key(0)
    return eqtrace.nn.Sequential(
        [
            eqtrace.nn.LIF(3, 4, recurrent=True, key=key),
            eqtrace.nn.LeakyReadout(4, 2, key=jr.fold_in(key, 1)),
        ]
    )


def _layout(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@pytest.mark.parametrize(
    "algorithm",
    [
        eqtrace.DRTRL(),
        eqtrace.EProp(),
        eqtrace.ExactWindows(eqtrace.DRTRL()),
        eqtrace.PPProp(0.5),
        eqtrace.RTRL(),
        eqtrace.UORO(key=jr.key(1)),
    ],
    ids=lambda a: type(a).__name__,
)
def test_plan_lays_out_the_trace(algorithm):
    model = _network()
    plan = eqtrace.prepare(algorithm, model)
    assert plan.network and len(plan.layers) == 2
    trace = algorithm.init_trace(model, model.init_state())
    assert jax.tree.structure(plan.trace) == jax.tree.structure(trace)
    assert _layout(plan.trace) == _layout(trace)
    assert eqtrace.trace_size(algorithm, model) == (plan.trace_floats, plan.trace_bytes)
    diagonal = isinstance(algorithm, eqtrace.DRTRL | eqtrace.EProp | eqtrace.PPProp) or (
        isinstance(algorithm, eqtrace.ExactWindows)
    )
    for layer in plan.layers:
        assert (layer.structure is not None) == diagonal
        assert (layer.neuron_axes is not None) == diagonal
        assert layer.rule is None if not algorithm.per_layer else layer.rule is not None
    assert (plan.neuron_axes is None) != diagonal


def test_trace_size_is_named_and_reads_as_text():
    model = eqtrace.nn.GRUCell(3, 16, key=jr.key(0))
    size = eqtrace.trace_size(eqtrace.RTRL(), model)
    assert isinstance(size, eqtrace.TraceSize)
    values, nbytes = size  # Still a pair.
    assert (size.values, size.bytes) == (values, nbytes) and values > 1000
    text = f"{values:,} values ({nbytes:,} bytes)"
    assert str(size) == f"{size}" == text and "," in text
    assert f"{size:>60}" == f"{text:>60}"


def test_plan_configures_each_layer():
    """EProp takes the decay of the read-out after the cell; the windows keep their rule."""
    model = _network()
    cell, readout = eqtrace.prepare(eqtrace.EProp(), model).layers
    assert cell.rule.readout_decay == pytest.approx(model.layers[1].decay)
    assert readout.rule.readout_decay is None
    windows = eqtrace.prepare(eqtrace.ExactWindows(eqtrace.DRTRL()), model)
    assert isinstance(windows.layers[0].rule, eqtrace.ExactWindows)
    assert isinstance(windows.layers[0].rule.rule, eqtrace.DRTRL)
    assert windows.layers[1].input.shape == (4,)  # The spikes of the cell below.


def test_init_trace_reads_a_given_plan():
    model = _network()
    plan = eqtrace.prepare(eqtrace.DRTRL(), model)
    trace = eqtrace.DRTRL().init_trace(model, model.init_state(), plan=plan)
    assert _layout(trace) == plan.trace


def test_prepare_raises_the_refusal():
    """The refusal a step would raise, before any step: e-prop under a `readout_decay` set by
    hand in a network, and a structure outside D-RTRL."""
    model = _network()
    with pytest.raises(ValueError, match="`readout_decay`"):
        eqtrace.prepare(eqtrace.EProp(readout_decay=0.9), model)
    gru = eqx.nn.GRUCell(3, 4, key=jr.key(0))

    class Wrapped(eqtrace.AbstractCell):
        core: eqx.nn.GRUCell
        input_size: int = 3

        def init_state(self):
            return jnp.zeros(4)

        def __call__(self, h, x):
            h = self.core(x, h)
            return h, h

        def output(self, h):
            return h

    with pytest.raises(eqtrace.StructureError):
        eqtrace.prepare(eqtrace.DRTRL(), Wrapped(gru))
    report = eqtrace.check(Wrapped(gru), eqtrace.DRTRL())
    assert report.refusal is not None and report.cells[0] is not None


def test_prepare_refuses_a_class_for_a_rule():
    with pytest.raises(TypeError, match="algorithm"):
        eqtrace.prepare(eqtrace.DRTRL, _network())


def test_check_sees_through_windows():
    """`check` reads the plan: the notes of the rule inside `ExactWindows`, and its sizes."""
    model = _network()
    inner = eqtrace.check(model, eqtrace.SnAp1())
    windows = eqtrace.check(model, eqtrace.ExactWindows(eqtrace.SnAp1()))
    assert any("SnAp-1 self-paths" in note for note in windows.notes)
    assert windows.notes == inner.notes
    assert (windows.trace_floats, windows.trace_bytes) == (inner.trace_floats, inner.trace_bytes)
    names = [[site.name for site in cell.sites] for cell in inner.cells]
    assert [[site.name for site in cell.sites] for cell in windows.cells] == names


def test_check_relaxes_the_rule_inside_windows():
    """A strict rule in `ExactWindows` refuses a cell that breaks its assumptions; `check`
    still sizes the trace, with the relaxed rule (`strict=False`), as for the rule alone."""
    cell, x = Rolling(3, 4, key=jr.key(0)), jnp.zeros(3)
    alone = eqtrace.check(cell, eqtrace.DRTRL(), x=x)
    windows = eqtrace.check(cell, eqtrace.ExactWindows(eqtrace.DRTRL()), x=x)
    assert windows.refusal is not None and windows.refusal == alone.refusal
    assert windows.trace_floats is not None
    assert (windows.trace_floats, windows.trace_bytes) == (alone.trace_floats, alone.trace_bytes)
    assert eqtrace.ExactWindows(eqtrace.DRTRL()).relaxed().rule.strict is False


def test_a_plan_for_another_model_is_refused():
    plan = eqtrace.prepare(eqtrace.DRTRL(), _network())
    cell = _network().layers[0]
    with pytest.raises(ValueError, match="`plan` was prepared for DRTRL on a model of 2"):
        eqtrace.DRTRL().init_trace(cell, cell.init_state(), plan=plan)
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("batch",))
    with pytest.raises(ValueError, match="Prepare it for this rule and model"):
        eqtrace.make_shardings(_network(), eqtrace.PPProp(0.5), mesh, plan=plan)


def _count_analyses(monkeypatch):
    """Counts the structure analyses from here on, with the memo of earlier ones forgotten
    (else a cell analysed before, by another test or by `init_trace`, is never analysed again
    and a step that re-prepared its plan on every call would go unseen)."""
    import eqtrace._structure as structure
    from eqtrace._memo import clear_structural_memos

    clear_structural_memos()

    calls = []
    analyse = structure._analyse

    def counted(*args):
        calls.append(type(args[0]).__name__)
        return analyse(*args)

    monkeypatch.setattr(structure, "_analyse", counted)
    return calls


@pytest.mark.parametrize(
    "algorithm",
    # A weight-shaped trace and pp-prop's; SnAp-1's and e-prop's under `LONG`.
    [eqtrace.DRTRL(), eqtrace.PPProp(0.5)] + ([eqtrace.SnAp1(), eqtrace.EProp()] if LONG else []),
    ids=lambda a: type(a).__name__,
)
def test_steps_read_the_structure_the_plan_holds(algorithm, monkeypatch):
    """With a plan given, neither a step nor a block nor their gradients analyse a cell, and
    they compute what they compute without it."""
    model = _network()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, x = model.init_state(), jnp.linspace(-1.0, 1.0, 3)
    xs = jnp.stack([x, 2 * x, -x])
    plan = eqtrace.prepare(algorithm, model, x)
    trace = algorithm.init_trace(model, state, plan=plan)

    def loss(params, run, inputs, **kwargs):
        model = eqx.combine(params, static)
        _, _, y = run(model, state, trace, inputs, **kwargs)
        return jnp.sum(y**2)

    without = [
        jax.grad(loss)(params, run, i) for run, i in ((algorithm.step, x), (algorithm.steps, xs))
    ]
    calls = _count_analyses(monkeypatch)
    with_plan = [
        jax.grad(loss)(params, run, i, plan=plan)
        for run, i in ((algorithm.step, x), (algorithm.steps, xs))
    ]
    assert calls == []
    for a, b in zip(without, with_plan):
        assert jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.all(u == v)), a, b))


def test_an_online_step_prepares_once(monkeypatch):
    """`make_online_step` prepares its plan on the first call and keeps it: one analysis of
    the cell for the value, the gradient, `vmap` and `jit`."""
    model = eqtrace.nn.GRUCell(3, 4, key=jr.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, eqtrace.DRTRL(), batch_size=2)
    calls = _count_analyses(monkeypatch)
    step = jax.vmap(eqtrace.make_online_step(eqtrace.DRTRL(), static), in_axes=(None, 0, 0, 0))
    xs = jnp.ones((2, 3))

    def loss(params):
        return jnp.sum(step(params, state, trace, xs)[2])

    loss(params)
    jax.grad(loss)(params)
    jax.jit(jax.grad(loss))(params)
    assert calls == ["GRUCell"]


def test_the_per_step_methods_need_a_prepared_rule():
    cell = eqtrace.nn.GRUCell(3, 4, key=jr.key(0))
    state = cell.init_state()
    trace = eqtrace.DRTRL().init_trace(cell, state)
    with pytest.raises(TypeError, match=r"eqtrace.prepare\(DRTRL\(\), model, x\)"):
        eqtrace.DRTRL().cell_step(cell, state, trace, jnp.ones(3))
    rule = eqtrace.prepare(eqtrace.DRTRL(), cell).layers[0].rule
    rule.cell_step(cell, state, trace, jnp.ones(3))


def test_prepared_rules_compare_and_hash_by_value():
    """A prepared rule is a valid static argument: two plans of one model give equal rules
    with equal hashes (the owner maps compared by value), unequal to the unprepared rule."""
    cell = eqtrace.nn.GRUCell(3, 4, key=jr.key(0))
    first, second = (eqtrace.prepare(eqtrace.SnAp1(), cell).layers[0].rule for _ in range(2))
    assert first is not second
    assert first == second and hash(first) == hash(second)
    assert first != eqtrace.SnAp1()
