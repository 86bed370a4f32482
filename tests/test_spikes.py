"""`eqtrace.nn.spikes` and `eqtrace.nn.firing_rates`: the spikes each cell declares, read from
hand-made states (single, batched, over time), in networks with non-spiking layers, under
`jit`/`vmap`/`scan`, and the errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqtrace
from eqtrace import nn


T, B = 5, 3


def _lif(key, **kwargs):
    return nn.LIF(2, 4, threshold=0.5, key=key, **kwargs)


def _alif(key, **kwargs):
    return nn.ALIF(2, 3, key=key, **kwargs)


def _membrane(rng, shape):
    # Values on both sides of the LIF threshold 0.5, none on it.
    return jnp.asarray(rng.choice([-0.3, 0.2, 0.49, 0.51, 0.9, 1.7], size=shape))


@pytest.mark.parametrize("synapse", [False, True])
def test_lif_spikes_are_the_membrane_above_threshold(getkey, rng, synapse):
    lif = _lif(getkey(), synapse=synapse)
    for shape in [(4,), (B, 4), (T, B, 4)]:
        v = _membrane(rng, shape)
        state = (v, jnp.ones(shape)) if synapse else (v,)  # the current plays no part
        s = nn.spikes(lif, state)
        assert s.shape == shape
        np.testing.assert_array_equal(s, (v > 0.5).astype(s.dtype))


def test_alif_spikes_are_its_last_state_leaf(getkey, rng):
    alif = _alif(getkey())
    v = jnp.full((T, B, 3), 5.0)  # far above threshold: the spikes are not computed from v
    a = jnp.zeros((T, B, 3))
    s = jnp.asarray(rng.integers(0, 2, size=(T, B, 3)), float)
    np.testing.assert_array_equal(nn.spikes(alif, (v, a, s)), s)
    synaptic = _alif(getkey(), synapse=True)
    np.testing.assert_array_equal(nn.spikes(synaptic, (v, v, a, s)), s)


def test_spikes_are_the_output_of_a_run(getkey):
    # Over a real run, the spikes read from each step's state are the cell's output.
    lif = nn.LIF(2, 4, threshold=0.5, recurrent=True, key=getkey())
    xs = 2.0 * jr.normal(getkey(), (T, 2))

    def body(state, x):
        state, y = lif(state, x)
        return state, (state, y)

    _, (states, ys) = jax.lax.scan(body, lif.init_state(), xs)
    assert 0 < float(jnp.sum(ys)) < ys.size  # some spikes, not all
    np.testing.assert_array_equal(nn.spikes(lif, states), ys)


def _network(key):
    k1, k2, k3, k4 = jr.split(key, 4)
    return nn.Sequential(
        [
            nn.LIF(2, 4, threshold=0.5, synapse=True, key=k1),
            eqx.nn.Linear(4, 2, key=k2),
            nn.GRUCell(2, 2, key=k3),
            nn.ALIF(2, 3, dt=0.5, key=k4),
            nn.LeakyReadout(3, 2, key=k4),
        ]
    )


def _states(rng, net, leading):
    """A state of `net` with the leading axes `leading`, every leaf drawn at random."""
    return jax.tree.map(
        lambda x: _membrane(rng, (*leading, *x.shape)), jax.eval_shape(net.init_state)
    )


def test_network_spikes_are_keyed_by_layer(getkey, rng):
    net = _network(getkey())
    for leading in [(), (B,), (T, B)]:
        states = _states(rng, net, leading)
        s = nn.spikes(net, states)
        assert list(s) == [0, 3]  # the Linear, GRU and read-out do not spike
        v_lif, s_alif = states[0][0], states[3][-1]
        np.testing.assert_array_equal(s[0], (v_lif > 0.5).astype(float))
        np.testing.assert_array_equal(s[3], s_alif)


def test_nested_network(getkey, rng):
    inner = nn.Sequential([eqx.nn.Linear(2, 2, key=getkey()), _alif(getkey())])
    net = nn.Sequential([inner, nn.LeakyReadout(3, 2, key=getkey())])
    states = _states(rng, net, (T,))
    s = nn.spikes(net, states)
    assert list(s) == [0] and list(s[0]) == [1]
    np.testing.assert_array_equal(s[0][1], states[0][1][-1])


def test_firing_rates_by_hand(getkey, rng):
    net = _network(getkey())
    states = _states(rng, net, (T, B))
    spikes_lif = np.asarray(states[0][0]) > 0.5
    spikes_alif = np.asarray(states[3][-1])
    # Spikes per step, in Hz: LIF's dt is 1 ms, ALIF's 0.5 ms.
    rates = nn.firing_rates(net, states)
    assert list(rates) == [0, 3]
    np.testing.assert_allclose(rates[0], 1000 * spikes_lif.mean())
    np.testing.assert_allclose(rates[3], 2000 * spikes_alif.mean())
    per_neuron = nn.firing_rates(net, states, per_neuron=True)
    np.testing.assert_allclose(per_neuron[0], 1000 * spikes_lif.mean(axis=(0, 1)))
    np.testing.assert_allclose(per_neuron[3], 2000 * spikes_alif.mean(axis=(0, 1)))
    # One `dt` for every layer; a time axis alone (one sample) is enough.
    override = nn.firing_rates(net, states, dt=4)
    np.testing.assert_allclose(override[3], 250 * spikes_alif.mean())
    single = jax.tree.map(lambda x: x[:, 0], states)
    np.testing.assert_allclose(nn.firing_rates(net, single)[0], 1000 * spikes_lif[:, 0].mean())


def test_under_jit_vmap_and_scan(getkey, rng):
    net = _network(getkey())
    states = _states(rng, net, (T, B))
    expected = nn.firing_rates(net, states, per_neuron=True)
    jitted = jax.jit(lambda st: nn.firing_rates(net, st, per_neuron=True))(states)
    for i in expected:
        np.testing.assert_allclose(jitted[i], expected[i])
    # Per sample inside `vmap`, per step inside `scan`: the same spikes as all at once.
    per_sample = jax.vmap(lambda st: nn.spikes(net, st), in_axes=1, out_axes=1)(states)
    _, per_step = jax.lax.scan(lambda c, st: (c, nn.spikes(net, st)), None, states)
    whole = nn.spikes(net, states)
    for i in whole:
        np.testing.assert_array_equal(per_sample[i], whole[i])
        np.testing.assert_array_equal(per_step[i], whole[i])


def test_spikes_carry_the_surrogate_gradient(getkey):
    lif = _lif(getkey())
    grad = jax.grad(lambda v: jnp.sum(nn.spikes(lif, (v,))))(jnp.array([0.4, 0.5, 0.6, 2.0]))
    assert jnp.all(grad > 0) and grad[1] > grad[3]  # largest at the threshold


class _Counter(nn.AbstractSpikingCell):
    """A user's spiking cell that keeps its spikes as its second state leaf."""

    dt: float = eqx.field(static=True)

    def init_state(self):
        return jnp.zeros(2), jnp.zeros(2)

    def __call__(self, state, x):
        count, _ = state
        fired = (count + x >= 1.0).astype(count.dtype)
        new_state = ((count + x) * (1 - fired), fired)
        return new_state, self.output(new_state)

    def output(self, state):
        return state[1]

    def spikes(self, state):
        return state[1]


def test_a_users_spiking_cell(getkey):
    cell = _Counter(dt=2.0)
    xs = jnp.full((6, 2), 0.5)  # fires every other step
    _, states = jax.lax.scan(lambda s, x: (cell(s, x)[0],) * 2, cell.init_state(), xs)
    np.testing.assert_array_equal(nn.spikes(cell, states)[:, 0], [0, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(nn.firing_rates(cell, states), 250.0)  # 1 / (2 × 2 ms)

    class Incomplete(nn.AbstractSpikingCell):  # no `spikes`, no `dt`
        def init_state(self):
            return jnp.zeros(2)

        def __call__(self, state, x):
            return state, state

    with pytest.raises(TypeError):
        Incomplete()


def test_errors(getkey, rng):
    gru = nn.GRUCell(2, 3, key=getkey())
    with pytest.raises(TypeError, match=r"received a GRUCell, which does not spike.*"):
        nn.spikes(gru, gru.init_state())
    readout_net = nn.Sequential([gru, eqx.nn.Linear(3, 2, key=getkey())])
    with pytest.raises(TypeError, match=r"layers \(0: GRUCell, 1: Linear\) include none"):
        nn.firing_rates(readout_net, readout_net.init_state())
    with pytest.raises(TypeError, match="eqtrace cell"):
        nn.spikes(eqx.nn.Linear(2, 2, key=getkey()), None)

    net = _network(getkey())
    states = _states(rng, net, (T, B))
    with pytest.raises(ValueError, match="is not a state of `model`"):
        nn.spikes(net, states[0])  # one layer's state for the network's
    lif = net.layers[0]
    with pytest.raises(ValueError, match=r"same leading axes.*\(\(5, 4\), \(3, 4\)\)"):
        nn.spikes(lif, (jnp.zeros((T, 4)), jnp.zeros((B, 4))))
    with pytest.raises(ValueError, match="stacked over time"):
        nn.firing_rates(lif, lif.init_state())
    with pytest.raises(ValueError, match="positive time step"):
        nn.firing_rates(net, states, dt=0.0)


def test_public_names():
    assert issubclass(nn.LIF, nn.AbstractSpikingCell)
    assert issubclass(nn.ALIF, nn.AbstractSpikingCell)
    assert issubclass(nn.AbstractSpikingCell, eqtrace.AbstractCell)
    assert not issubclass(nn.LeakyReadout, nn.AbstractSpikingCell)
