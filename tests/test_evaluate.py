"""`eqtrace.tasks.evaluate`: accuracy in the decision window, firing rates and loss on hand-made
batches whose answers are known, and the errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqtrace
from eqtrace import nn, tasks


class _Echo(eqtrace.AbstractCell):
    """Outputs its input: the class scores of each step are given by the batch itself."""

    size: int = eqx.field(static=True)

    def init_state(self):
        return jnp.zeros(self.size)

    def __call__(self, state, x):
        return x, x


def _scores():
    # (T=4, B=4, 2 classes). Sample 0: class 1 wins the window (steps 2-3) though class 0
    # wins its last step; sample 1: class 0 in the window; sample 2: its window is steps
    # 1-2 only (step 3, outside it, would flip the vote); sample 3: no window at all.
    scores = np.zeros((4, 4, 2))
    scores[2, 0], scores[3, 0] = [0.0, 3.0], [1.0, 0.0]
    scores[2, 1], scores[3, 1] = [2.0, 0.0], [2.0, 1.0]
    scores[1, 2], scores[2, 2], scores[3, 2] = [0.0, 1.0], [0.0, 1.0], [9.0, 0.0]
    scores[:, 3] = [5.0, 0.0]
    mask = np.zeros((4, 4), bool)
    mask[2:, :2] = True
    mask[1:3, 2] = True
    return jnp.asarray(scores), jnp.asarray(mask)


def test_vote_in_the_decision_window():
    scores, mask = _scores()
    # Votes: 1, 0, 1 (sample 3 not counted). Labels 1, 1, 1, 0: two of three right.
    labels = jnp.broadcast_to(jnp.array([1, 1, 1, 0]), (4, 4))
    result = tasks.evaluate(_Echo(2), tasks.Batch(scores, labels, mask))
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.rates is None and result.loss is None
    # The label is the target at the last step of each window, not at the sequence's end.
    shifted = labels.at[3, 2].set(0)
    assert tasks.evaluate(_Echo(2), (scores, shifted, mask)).accuracy == pytest.approx(2 / 3)
    assert np.isnan(tasks.evaluate(_Echo(2), (scores, labels, mask & False)).accuracy)


def test_per_step_accuracy_and_loss():
    scores, mask = _scores()
    # Per step, the argmax in the window: sample 0 (1, 0), 1 (0, 0), 2 (1, 1).
    targets = jnp.zeros((4, 4), jnp.int32).at[2, 0].set(1).at[2, 2].set(1)
    result = tasks.evaluate(
        _Echo(2), tasks.Batch(scores, targets, mask), per_step=True, loss_fn=lambda y, t: -y[t]
    )
    assert result.accuracy == pytest.approx(5 / 6)
    # The mean of -score[target] over the six steps of the windows.
    expected = -(3.0 + 1.0 + 2.0 + 2.0 + 0.0 + 1.0) / 6
    assert result.loss == pytest.approx(expected)


def test_real_valued_targets_have_a_loss_and_no_accuracy(getkey):
    xs = jr.normal(getkey(), (3, 2, 1))
    batch = tasks.Batch(xs, xs + 1.0, jnp.ones((3, 2), bool).at[0].set(False))
    result = tasks.evaluate(_Echo(1), batch, loss_fn=lambda y, t: jnp.sum((y - t) ** 2))
    assert result.accuracy is None
    assert result.loss == pytest.approx(1.0)


def _pulses(key):
    """A LIF layer of 3 neurons, each driven by its own input through a unit weight, and a
    read-out. With τ_mem = 1 ms an input pulse of 2 fires its neuron once (2 > 1), and the
    reset leaves it below threshold until the next pulse."""
    lif = nn.LIF(3, 3, tau_mem=1.0, dt=0.5, key=key)
    lif = eqx.tree_at(lambda c: c.input_op.weight, lif, jnp.eye(3))
    return nn.Sequential([lif, nn.LeakyReadout(3, 2, key=key)])


def test_rates_count_the_spikes(getkey):
    net = _pulses(getkey())
    inputs = np.zeros((8, 2, 3))
    inputs[[0, 4], 0, 0] = 2.0  # sample 0, neuron 0: two spikes
    inputs[[2, 3, 6], 1, 2] = 2.0  # sample 1, neuron 2: three
    batch = tasks.Batch(jnp.asarray(inputs), jnp.zeros((8, 2), jnp.int32), jnp.ones((8, 2), bool))
    result = tasks.evaluate(net, batch)
    # Five spikes in 8 steps × 2 samples × 3 neurons, steps of 0.5 ms.
    assert list(result.rates) == [0]
    assert result.rates[0] == pytest.approx(5 / 48 * 2000)

    # The same as `firing_rates` of the states of a run by hand.
    state0 = jax.vmap(lambda _: net.init_state())(jnp.arange(2))
    _, states = jax.lax.scan(lambda s, x: (jax.vmap(net)(s, x)[0],) * 2, state0, batch.inputs)
    assert result.rates[0] == pytest.approx(float(nn.firing_rates(net, states)[0]))


def test_a_task_batch_against_a_run_by_hand(getkey):
    # A spiking network on delayed match-to-sample: the accuracy is that of votes computed
    # from a run by hand (the mean read-out over the test window).
    batch = tasks.delayed_match_to_sample(
        getkey(), 16, fixation=2, sample=3, delay=4, test=3, n_inputs=6
    )
    alif = nn.ALIF(6, 8, recurrent=True, key=getkey())
    alif = eqx.tree_at(lambda c: c.input_op.weight, alif, 5 * alif.input_op.weight)
    net = nn.Sequential([alif, nn.LeakyReadout(8, 2, key=getkey())])
    result = tasks.evaluate(net, batch)

    def body(state, x):
        state, y = jax.vmap(net)(state, x)
        return state, (state, y)

    state0 = jax.vmap(lambda _: net.init_state())(jnp.arange(16))
    _, (states, ys) = jax.lax.scan(body, state0, batch.inputs)
    votes = jnp.argmax(jnp.mean(ys[-3:], axis=0), axis=-1)
    assert result.accuracy == pytest.approx(float(jnp.mean(votes == batch.targets[-1])))
    assert result.rates[0] == pytest.approx(1000 * float(jnp.mean(states[0][-1])))


def test_errors(getkey):
    scores, mask = _scores()
    labels = jnp.zeros((4, 4), jnp.int32)
    with pytest.raises(TypeError, match=r"`batch` must be .* but received a tuple of 2 entries"):
        tasks.evaluate(_Echo(2), (scores, labels))
    with pytest.raises(TypeError, match=r"`batch.mask` must be boolean.*mask.astype\(bool\)"):
        tasks.evaluate(_Echo(2), (scores, labels, mask.astype(float)))
    with pytest.raises(ValueError, match=r"start with the `\(T, B\)` = \(4, 4\)"):
        tasks.evaluate(_Echo(2), (scores, labels[:, :3], mask))
    with pytest.raises(ValueError, match=r"one score per class, of shape `\(n_classes,\)`"):
        tasks.evaluate(_Wide(), (scores, labels, mask))
    with pytest.raises(ValueError, match="have no classes"):
        tasks.evaluate(_Echo(2), (scores, scores, mask), per_step=True)
    with pytest.raises(ValueError, match=r"time-major with a batch axis"):
        tasks.evaluate(_Echo(2), (scores[:, 0, 0], labels[:, 0], mask[:, 0]))
    with pytest.raises(TypeError, match="eqtrace cell"):
        tasks.evaluate(eqx.nn.Linear(2, 2, key=getkey()), (scores, labels, mask))


class _Wide(eqtrace.AbstractCell):
    """Outputs a `(2, 2)` array: not one score per class."""

    def init_state(self):
        return jnp.zeros(2)

    def __call__(self, state, x):
        return x, jnp.stack([x, x])
