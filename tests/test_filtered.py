"""`eqtrace.Filtered` against its oracles: BPTT on stacks of element-wise layers under a leaky
consumer (a leaky read-out, a synaptic filter), where the wrapped rule is not exact; e-prop
where it applies; RTRL at T = 1; blocks = steps; batch = per-sample; jit = no jit; and the
consumers it reads no leak from (the rule then runs unfiltered)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

import eqtrace
from eqtrace import nn
from eqtrace._consumer import consumer_leak
from helpers import online_and_bptt, online_in_blocks, relative_error, squared_loss


LENGTH, INPUT, HIDDEN, OUTPUT = 6, 3, 4, 2
RULES = {
    "drtrl": lambda: eqtrace.Filtered(eqtrace.DRTRL()),
    "snap1": lambda: eqtrace.Filtered(eqtrace.SnAp1()),
}


class SynapticFilter(eqtrace.AbstractCell):
    """A synaptic filter with nothing to learn, `i_t = α i_{t-1} + x_t`: a leaky consumer."""

    size: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True, default=0.7)

    def init_state(self):
        return jnp.zeros(self.size)

    def __call__(self, state, x):
        state = self.alpha * state + x
        return state, state


class LearntLeak(eqtrace.AbstractCell):
    """A leaky integrator whose leak is a parameter: no constant leak to fold in."""

    log_tau: jax.Array

    def __init__(self, size):
        self.log_tau = jnp.zeros(size)

    def init_state(self):
        return jnp.zeros(self.log_tau.shape)

    def __call__(self, state, x):
        state = jnp.exp(-1 / jnp.exp(self.log_tau)) * state + x
        return state, state


def _lif(key, recurrent=False):
    mask = jnp.eye(HIDDEN, dtype=bool) if recurrent else None
    return nn.LIF(INPUT, HIDDEN, tau_mem=5.0, recurrent=recurrent, recurrent_mask=mask, key=key)


def _online(algorithm, model, xs, targets):
    """The summed per-step online gradient (through the trace path), without BPTT's."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    plan = eqtrace.prepare(algorithm, model, xs[0])
    state = model.init_state()
    trace = algorithm.init_trace(model, state, plan=plan)
    step = eqtrace.make_online_step(algorithm, static, plan=plan)
    return eqtrace.online_gradient(
        step, squared_loss, params, state, trace, xs, targets, reduction="sum"
    )[1]


def _data(key, length=LENGTH, outputs=OUTPUT):
    xkey, tkey = jr.split(key)
    return 2.0 * jr.normal(xkey, (length, INPUT)), jr.normal(tkey, (length, outputs))


def _models(key):
    k1, k2, k3 = jr.split(key, 3)
    return {
        # A feed-forward LIF under a leaky read-out (e-prop's case).
        "readout": nn.Sequential([_lif(k1), nn.LeakyReadout(HIDDEN, OUTPUT, tau=4.0, key=k2)]),
        # Under a synaptic filter without parameters, then a stateless read-out.
        "synapse": nn.Sequential(
            [_lif(k1), SynapticFilter(HIDDEN), eqx.nn.Linear(HIDDEN, OUTPUT, key=k3)]
        ),
        # Element-wise recurrence through each neuron's own recurrent weight (SnAp-1's paths).
        "self-recurrent": nn.Sequential(
            [_lif(k1, recurrent=True), nn.LeakyReadout(HIDDEN, OUTPUT, tau=4.0, key=k2)]
        ),
    }


# (D-RTRL's filter under a leaky read-out is e-prop's, held to BPTT in test_eprop.py.)
@pytest.mark.parametrize("rule, model_name", [("drtrl", "synapse"), ("snap1", "self-recurrent")])
def test_equals_bptt_on_element_wise_layers(rule, model_name, getkey):
    model = _models(getkey())[model_name]
    xs, targets = _data(getkey())
    online, bptt = online_and_bptt(RULES[rule](), model, xs, targets)
    assert relative_error(online, bptt) <= 1e-12
    # Not vacuous: the unwrapped rule drops the consumer's leak.
    assert relative_error(_online(RULES[rule]().rule, model, xs, targets), bptt) > 1e-2


def test_drtrl_filtered_is_eprop(getkey):
    model = _models(getkey())["readout"]
    xs, targets = _data(getkey())
    filtered = _online(RULES["drtrl"](), model, xs, targets)
    assert relative_error(filtered, _online(eqtrace.EProp(), model, xs, targets)) == 0.0
    # e-prop reads its filter the same way: from a synaptic filter too.
    model = _models(getkey())["synapse"]
    layers = eqtrace.prepare(eqtrace.EProp(), model).layers
    assert layers[0].rule.readout_decay == 0.7


def test_equals_rtrl_at_the_first_step(getkey):
    # A recurrent spiking layer (not element-wise) under a leaky read-out, from a random state.
    k1, k2 = jr.split(getkey())
    alif = nn.ALIF(INPUT, HIDDEN, recurrent=True, beta=0.5, key=k1)
    model = nn.Sequential([alif, nn.LeakyReadout(HIDDEN, OUTPUT, tau=4.0, key=k2)])
    state = jtu.tree_map(lambda a: jr.uniform(getkey(), a.shape, a.dtype), model.init_state())
    xs, targets = _data(getkey(), length=1)
    online, bptt = online_and_bptt(RULES["snap1"](), model, xs, targets, state=state)
    assert relative_error(online, bptt) <= 1e-12


def test_blocks_equal_steps(getkey):
    # (D-RTRL's filtered blocks are e-prop's, held to stepping in test_eprop.py.)
    rule = "snap1"
    k1, k2 = jr.split(getkey())
    alif = nn.ALIF(INPUT, HIDDEN, recurrent=True, beta=0.5, key=k1)
    model = nn.Sequential([alif, nn.LeakyReadout(HIDDEN, OUTPUT, tau=4.0, key=k2)])
    xs, targets = _data(getkey())
    stepped = _online(RULES[rule](), model, xs, targets)
    _, blocked, _, _ = online_in_blocks(RULES[rule](), model, xs, targets, 3)
    assert relative_error(blocked, stepped) <= 1e-12


def test_batch_equals_per_sample_and_jit_equals_no_jit(getkey):
    algorithm = RULES["snap1"]()
    model = _models(getkey())["self-recurrent"]
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batch, length = 2, 4
    xs = 2.0 * jr.normal(getkey(), (length, batch, INPUT))
    targets = jr.normal(getkey(), (length, batch, OUTPUT))
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch)

    def batch_loss(y, t):
        return jnp.sum((y - t) ** 2) / batch

    def gradient(xs):
        return eqtrace.online_gradient(
            step, batch_loss, params, state, trace, xs, targets, reduction="sum"
        )[1]

    batched = gradient(xs)
    per_sample = [_online(algorithm, model, xs[:, b], targets[:, b]) for b in range(batch)]
    mean = jtu.tree_map(lambda *g: sum(g) / batch, *per_sample)
    assert relative_error(batched, mean) <= 1e-12
    assert relative_error(jax.jit(gradient)(xs), batched) <= 1e-12


def test_consumers_without_a_constant_leak_leave_the_rule_unfiltered(getkey):
    k1, k2 = jr.split(getkey())
    lif = _lif(k1)
    assert consumer_leak(lif, nn.LeakyReadout(HIDDEN, 2, tau=4.0, key=k2)).leak == pytest.approx(
        nn.LeakyReadout(HIDDEN, 2, tau=4.0, key=k2).decay
    )
    assert consumer_leak(lif, SynapticFilter(HIDDEN)).leak == 0.7
    # The same under a trace (a rule prepared inside `jit`, the parameters tracers).
    readout = nn.LeakyReadout(HIDDEN, 2, tau=4.0, key=k2)
    params, static = eqx.partition(readout, eqx.is_inexact_array)
    leaks = []
    jax.jit(lambda p: leaks.append(consumer_leak(lif, eqx.combine(p, static)).leak))(params)
    assert leaks == [consumer_leak(lif, readout).leak]
    refused = {
        "a spiking layer (its reset)": nn.LIF(HIDDEN, 2, key=k2),
        "a learnt time constant": LearntLeak(HIDDEN),
        "recurrent weights": nn.RNNCell(HIDDEN, 2, key=k2),
        "a stateless layer": eqx.nn.Linear(HIDDEN, 2, key=k2),
    }
    for what, consumer in refused.items():
        analysis = consumer_leak(lif, consumer)
        assert analysis.leak is None and analysis.problems, what
    # Under such a consumer, the rule is the wrapped rule, exactly.
    model = nn.Sequential([lif, LearntLeak(HIDDEN)])
    xs, targets = _data(getkey(), outputs=HIDDEN)
    filtered = _online(RULES["snap1"](), model, xs, targets)
    assert relative_error(filtered, _online(eqtrace.SnAp1(), model, xs, targets)) == 0.0
    notes = (
        eqtrace.prepare(RULES["snap1"](), model)
        .layers[0]
        .rule.cell_notes(lif, lif.init_state(), jnp.zeros(INPUT))
    )
    assert "no filter" in notes[-1]
