"""`eqtrace.tasks`: layouts, determinism, balance, answers computable from the inputs, delays
in the right place, and clear errors."""

import random
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import eqtrace
from eqtrace import nn, tasks


# task -> (small arguments, input size, the window where the loss counts, as (start, stop))
SMALL = {
    "cue_recall": (dict(cue=5, delay=7, recall=4, population=3), 12, (12, 16)),
    "delayed_match_to_sample": (
        dict(fixation=2, sample=5, delay=7, test=4, n_inputs=8, n_directions=4),
        8,
        (14, 18),
    ),
    "evidence_accumulation": (
        dict(n_cues=3, cue=4, interval=6, delay=5, recall=3, population=2),
        8,
        (23, 26),
    ),
    "copy_task": (dict(length=3, delay=4, n_symbols=5), 7, (8, 11)),
    "adding_task": (dict(length=6, delay=3), 2, (8, 9)),
}
CLASSIFICATION = ["cue_recall", "delayed_match_to_sample", "evidence_accumulation"]


def _batch(name, key, batch_size=5, **overrides):
    kwargs, _, _ = SMALL[name]
    return getattr(tasks, name)(key, batch_size, **{**kwargs, **overrides})


@pytest.mark.parametrize("name", sorted(SMALL))
def test_layout(name):
    _, n_in, (start, stop) = SMALL[name]
    batch = _batch(name, jr.key(0))
    inputs, targets, mask = batch  # a `Batch` unpacks
    length = stop if name != "adding_task" else 9
    assert inputs.shape == (length, 5, n_in)
    assert inputs.dtype == jnp.result_type(float)  # float64 in this suite
    if name == "adding_task":
        assert targets.shape == (length, 5, 1) and targets.dtype == inputs.dtype
    else:
        assert targets.shape == (length, 5) and targets.dtype == jnp.int32
    assert mask.shape == (length, 5) and mask.dtype == jnp.bool_
    expected = np.zeros(length, bool)
    expected[start:stop] = True
    assert (np.asarray(mask) == expected[:, None]).all()
    assert _batch(name, jr.key(0), dtype=jnp.float32).inputs.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(SMALL))
def test_deterministic_by_key(name):
    a, b, c = (_batch(name, key) for key in (jr.key(1), jr.key(1), jr.key(2)))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.inputs), np.asarray(c.inputs))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_jit_equals_eager(name):
    kwargs, _, _ = SMALL[name]
    generate = getattr(tasks, name)
    eager = generate(jr.key(3), 4, **kwargs)
    jitted = eqx.filter_jit(generate)(jr.key(3), 4, **kwargs)  # ints are static
    for x, y in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_labels_balanced_and_constant_over_time(name):
    batch = _batch(name, jr.key(4), batch_size=2000)
    labels = np.asarray(batch.targets[-1])
    assert set(np.unique(labels)) == {0, 1}
    assert 0.45 < labels.mean() < 0.55
    assert (np.asarray(batch.targets) == labels).all()


def test_cue_recall_answer_from_inputs():
    batch = tasks.cue_recall(
        jr.key(5), 300, cue=20, delay=30, recall=10, population=10, cue_rate=200.0
    )
    spikes, labels = np.asarray(batch.inputs), np.asarray(batch.targets[-1])
    a, b, recall, noise = np.split(spikes, 4, axis=-1)
    # Only the cue population of the label fires, and only during the cue.
    count_a, count_b = a.sum(axis=(0, 2)), b.sum(axis=(0, 2))
    assert (labels == (count_b > count_a)).all()
    assert a[20:].sum() == 0 and b[20:].sum() == 0
    assert recall[:50].sum() == 0 and recall[50:].sum() > 0
    assert noise.sum() > 0


def _decode_directions(counts, n_inputs, n_directions, kappa):
    """Maximum-likelihood direction from the spike counts of direction-tuned neurons."""
    preferred = 2 * np.pi * np.arange(n_inputs) / n_inputs
    directions = 2 * np.pi * np.arange(n_directions) / n_directions
    log_tuning = kappa * (np.cos(directions[:, None] - preferred[None]) - 1)  # (D, n)
    return np.argmax(counts @ log_tuning.T, axis=-1)


def test_delayed_match_to_sample_answer_from_inputs():
    kwargs = dict(fixation=5, sample=50, delay=40, test=50, n_inputs=24, n_directions=8)
    batch = tasks.delayed_match_to_sample(jr.key(6), 300, rate=500.0, background_rate=0.0, **kwargs)
    spikes, labels = np.asarray(batch.inputs), np.asarray(batch.targets[-1])
    sample = _decode_directions(spikes[5:55].sum(0), 24, 8, 8.0)
    test = _decode_directions(spikes[95:].sum(0), 24, 8, 8.0)
    assert (labels == (sample == test)).all()
    assert len(np.unique(sample)) == 8  # every direction occurs
    # Without background, nothing fires outside the sample and test windows.
    assert spikes[:5].sum() == 0 and spikes[55:95].sum() == 0
    assert spikes[5:55].sum(axis=(0, 2)).min() > 0 and spikes[95:].sum(axis=(0, 2)).min() > 0


def test_evidence_accumulation_answer_from_inputs():
    n_cues, cue, interval = 5, 10, 15
    batch = tasks.evidence_accumulation(
        jr.key(7),
        300,
        n_cues=n_cues,
        cue=cue,
        interval=interval,
        delay=20,
        recall=5,
        population=10,
        cue_rate=900.0,
        noise_rate=10.0,
    )
    spikes, labels = np.asarray(batch.inputs), np.asarray(batch.targets[-1])
    left, right, recall, noise = np.split(spikes, 4, axis=-1)
    # Each cue window shows one side; the label is the side shown more often...
    votes = []
    for k in range(n_cues):
        window = slice(k * interval, k * interval + cue)
        on_left, on_right = left[window].sum(axis=(0, 2)), right[window].sum(axis=(0, 2))
        assert ((on_left == 0) | (on_right == 0)).all() and (on_left + on_right > 0).all()
        votes.append(on_right > on_left)
        gap = slice(k * interval + cue, (k + 1) * interval)
        assert left[gap].sum() == 0 and right[gap].sum() == 0
    assert (labels == (2 * np.sum(votes, axis=0) > n_cues)).all()
    # ... and, at this high rate, the side with more cue spikes.
    assert (labels == (right.sum(axis=(0, 2)) > left.sum(axis=(0, 2)))).all()
    # Both kinds of trials occur: unanimous cues and mixed ones.
    assert 0 < np.mean(np.sum(votes, axis=0) % n_cues == 0) < 1
    # Silent delay: the cue populations are quiet after the cues; recall only at the end.
    end = n_cues * interval
    assert left[end:].sum() == 0 and right[end:].sum() == 0
    assert recall[: end + 20].sum() == 0 and recall[end + 20 :].sum() > 0
    assert noise.sum() > 0


def test_evidence_accumulation_bias():
    sides_agree = []
    for bias in (0.0, 1.0):
        batch = tasks.evidence_accumulation(
            jr.key(8), 50, n_cues=3, cue=2, interval=2, delay=0, recall=1, cue_rate=900.0, bias=bias
        )
        left, right = np.asarray(batch.inputs[:6, :, :10]), np.asarray(batch.inputs[:6, :, 10:20])
        # With bias 0 or 1, the three cues of a trial are all on one side.
        per_cue = [right[2 * k : 2 * k + 2].sum(axis=(0, 2)) > 0 for k in range(3)]
        sides_agree.append((per_cue[0] == per_cue[1]).all() and (per_cue[1] == per_cue[2]).all())
        assert left.sum() + right.sum() > 0
    assert all(sides_agree)


def test_copy_task_answer_from_inputs():
    length, delay, n_symbols = 4, 6, 5
    batch = tasks.copy_task(jr.key(9), 50, length=length, delay=delay, n_symbols=n_symbols)
    inputs, targets = np.asarray(batch.inputs), np.asarray(batch.targets)
    assert (inputs.sum(-1) == 1).all()  # one-hot
    tokens = inputs.argmax(-1)
    blank, go = n_symbols, n_symbols + 1
    assert (tokens[:length] < n_symbols).all()
    assert (tokens[length : length + delay] == blank).all()
    assert (tokens[length + delay] == go).all()
    assert (tokens[length + delay + 1 :] == blank).all()
    np.testing.assert_array_equal(targets[-length:], tokens[:length])
    assert (targets[:-length] == blank).all()


def test_adding_task_answer_from_inputs():
    length, delay = 10, 5
    batch = tasks.adding_task(jr.key(10), 200, length=length, delay=delay)
    inputs, targets = np.asarray(batch.inputs), np.asarray(batch.targets)
    values, markers = inputs[..., 0], inputs[..., 1]
    assert (markers.sum(0) == 2).all()
    assert (markers[: length // 2].sum(0) == 1).all() and (markers[length // 2 :].sum(0) == 1).all()
    np.testing.assert_allclose(targets[-1, :, 0], (values * markers).sum(0), rtol=1e-15)
    assert (inputs[length:] == 0).all()  # the delay carries nothing
    assert ((0 <= values[:length]) & (values[:length] < 1)).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_delay_moves_the_decision(name):
    # Ten more delay steps: the sequence is ten steps longer and the loss window still ends it.
    kwargs, _, _ = SMALL[name]
    short = _batch(name, jr.key(11))
    long = _batch(name, jr.key(11), delay=kwargs["delay"] + 10)
    assert long.inputs.shape[0] == short.inputs.shape[0] + 10
    window = np.asarray(short.mask[:, 0]).sum()
    assert np.asarray(long.mask[:, 0]).sum() == window
    assert np.asarray(long.mask[-window:]).all()


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: tasks.cue_recall(jr.key(0), 2, delay=-1), "`delay`"),
        (lambda: tasks.cue_recall(jr.key(0), 0), "`batch_size`"),
        (lambda: tasks.cue_recall(jr.key(0), 2, cue=0), "`cue`"),
        (lambda: tasks.cue_recall(jr.key(0), 2, cue_rate=-5.0), "`cue_rate`"),
        (lambda: tasks.cue_recall(jr.key(0), 2, cue_rate=2000.0), "`cue_rate`"),
        (lambda: tasks.cue_recall(jr.key(0), 2, dt=0.0), "`dt`"),
        (lambda: tasks.delayed_match_to_sample(jr.key(0), 2, delay=-3), "`delay`"),
        (lambda: tasks.delayed_match_to_sample(jr.key(0), 2, n_directions=1), "`n_directions`"),
        (lambda: tasks.delayed_match_to_sample(jr.key(0), 2, kappa=-1.0), "`kappa`"),
        (lambda: tasks.delayed_match_to_sample(jr.key(0), 2, test=0), "`test`"),
        (lambda: tasks.evidence_accumulation(jr.key(0), 2, delay=-1), "`delay`"),
        (lambda: tasks.evidence_accumulation(jr.key(0), 2, n_cues=4), "`n_cues` must be odd"),
        (lambda: tasks.evidence_accumulation(jr.key(0), 2, cue=20, interval=10), "`cue`"),
        (lambda: tasks.evidence_accumulation(jr.key(0), 2, bias=1.5), "`bias`"),
        (lambda: tasks.copy_task(jr.key(0), 2, delay=-1), "`delay`"),
        (lambda: tasks.copy_task(jr.key(0), 2, length=0), "`length`"),
        (lambda: tasks.adding_task(jr.key(0), 2, delay=-2), "`delay`"),
        (lambda: tasks.adding_task(jr.key(0), 2, length=1), "`length`"),
        (lambda: tasks.mnist1d(num_samples=5), "`num_samples`"),
    ],
)
def test_bad_arguments(call, argument):
    with pytest.raises(ValueError) as error:
        call()
    assert argument in str(error.value)


def test_rate_error_says_how_high():
    with pytest.raises(ValueError, match=r"= 1.2, must be at most 1"):
        tasks.delayed_match_to_sample(jr.key(0), 2, rate=1000.0, background_rate=200.0)


def test_a_batch_feeds_the_drivers(getkey):
    # The layout is the drivers': a vmapped step over `inputs`, `(targets, mask)` as targets.
    batch = tasks.evidence_accumulation(
        getkey(), 4, n_cues=3, cue=3, interval=4, delay=2, recall=2, population=2
    )
    model = nn.Sequential([nn.LIF(8, 6, key=getkey()), nn.LeakyReadout(6, 2, key=getkey())])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    algorithm = eqtrace.DRTRL()
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=4)

    def loss_fn(y, target):
        labels, mask = target
        losses = optax.softmax_cross_entropy_with_integer_labels(y, labels)
        return jnp.sum(mask * losses) / mask.shape[0]

    loss, grads, _, _ = eqtrace.online_gradient(
        step,
        loss_fn,
        params,
        state,
        trace,
        batch.inputs,
        (batch.targets, batch.mask),
        reduction="sum",
    )
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_mnist1d():
    pytest.importorskip("mnist1d")
    np.random.seed(0)
    random.seed(0)
    expected = np.random.rand(), random.random()
    np.random.seed(0)
    random.seed(0)
    data = tasks.mnist1d(seed=3, num_samples=100)
    # The package seeds the global random states; they are restored.
    assert (np.random.rand(), random.random()) == expected
    assert data["x_train"].shape == (80, 40, 1) and data["x_test"].shape == (20, 40, 1)
    assert data["x_train"].dtype == np.float32 and data["y_train"].dtype == np.int32
    assert data["y_test"].shape == (20,)
    assert abs(data["x_train"].mean()) < 1e-5 and abs(data["x_train"].std() - 1) < 1e-5
    assert set(np.unique(data["y_train"])) <= set(range(10))
    again = tasks.mnist1d(seed=3, num_samples=100)
    for key in data:
        np.testing.assert_array_equal(data[key], again[key])


def test_mnist1d_without_the_package(monkeypatch):
    # `None` in `sys.modules` makes the import fail, as if the package were not installed.
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        tasks.mnist1d()
