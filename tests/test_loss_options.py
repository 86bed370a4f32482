"""The drivers' loss options: `reduction`, `step_weights` and `sequence_targets`.

Each option is checked against a hand-written equivalent (the old recipe of broadcasting the
target and multiplying the loss by a flag inside `loss_fn`), and the online rules against BPTT
where they are exact (RTRL; D-RTRL on an element-wise layer), so an option that drops or
double-counts a step's loss fails."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
import pytest

import eqtrace
from eqtrace import nn
from helpers import LeakyTanh, mse, tree_allclose
from registry import rules


LENGTH, BATCH, INPUT, HIDDEN = 7, 3, 2, 4


def _setup(algorithm, model, block=False):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    make = eqtrace.make_online_block if block else eqtrace.make_online_step
    time_axis = 1 if block else 0
    step = jax.vmap(
        make(algorithm, static),
        in_axes=(None, 0, 0, time_axis),
        out_axes=(0, 0, time_axis),
    )
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    state, trace = eqtrace.init_state_and_trace(
        model, algorithm, batch_size=BATCH, x=jnp.zeros(INPUT)
    )
    return params, step, forward, state, trace


def _data(key=jr.key(1)):
    xkey, tkey = jr.split(key)
    xs = jr.normal(xkey, (LENGTH, BATCH, INPUT))
    label_targets = jr.normal(tkey, (BATCH, HIDDEN))  # one per sequence
    return xs, label_targets


def _flagged_loss(y, target_and_weight):
    """The hand-written recipe: the weight travels with the target."""
    target, weight = target_and_weight
    return weight * mse(y, target)


WEIGHTS = jnp.array([0.0, 0.5, 0.0, 1.0, 2.0, 0.0, 1.0])


@pytest.mark.parametrize("block_size", [None, 3])
def test_online_options_equal_the_hand_written_recipe(block_size):
    model = nn.GRUCell(INPUT, HIDDEN, key=jr.key(0))
    params, step, _, state, trace = _setup(eqtrace.DRTRL(), model, block=block_size is not None)
    xs, label = _data()
    broadcast = jnp.broadcast_to(label, (LENGTH, *label.shape))
    kwargs = dict(block_size=block_size)
    expected_loss, expected, _, _ = eqtrace.online_gradient(  # the weighted sum, by hand
        step,
        _flagged_loss,
        params,
        state,
        trace,
        xs,
        (broadcast, WEIGHTS),
        reduction="sum",
        **kwargs,
    )
    for targets, sequence_targets in [(broadcast, False), (label, True)]:
        loss, grads, _, _ = eqtrace.online_gradient(
            step, mse, params, state, trace, xs, targets, reduction="sum",
            step_weights=WEIGHTS, sequence_targets=sequence_targets, **kwargs,
        )  # fmt: skip
        assert jnp.allclose(loss, expected_loss, rtol=1e-12)
        assert tree_allclose(grads, expected, rtol=1e-12)
        mean_loss, mean_grads, _, _ = eqtrace.online_gradient(
            step, mse, params, state, trace, xs, targets, reduction="mean",
            step_weights=WEIGHTS, sequence_targets=sequence_targets, **kwargs,
        )  # fmt: skip
        total = jnp.sum(WEIGHTS)
        assert jnp.allclose(mean_loss, expected_loss / total, rtol=1e-12)
        assert tree_allclose(mean_grads, jtu.tree_map(lambda g: g / total, expected), rtol=1e-12)


def test_mean_without_weights_divides_by_the_length():
    model = nn.GRUCell(INPUT, HIDDEN, key=jr.key(0))
    params, step, forward, state, trace = _setup(eqtrace.RTRL(), model)
    xs, label = _data()
    targets = jnp.broadcast_to(label, (LENGTH, *label.shape))
    summed = eqtrace.online_gradient(step, mse, params, state, trace, xs, targets, reduction="sum")
    mean = eqtrace.online_gradient(step, mse, params, state, trace, xs, targets, reduction="mean")
    default = eqtrace.online_gradient(step, mse, params, state, trace, xs, targets)
    assert jnp.array_equal(default[0], mean[0]) and tree_allclose(default[1], mean[1], rtol=0)
    assert jnp.allclose(mean[0], summed[0] / LENGTH, rtol=1e-12)
    assert tree_allclose(mean[1], jtu.tree_map(lambda g: g / LENGTH, summed[1]), rtol=1e-12)
    bptt_sum = eqtrace.bptt_gradient(forward, mse, params, state, xs, targets, reduction="sum")
    bptt_mean = eqtrace.bptt_gradient(forward, mse, params, state, xs, targets, reduction="mean")
    bptt_default = eqtrace.bptt_gradient(forward, mse, params, state, xs, targets)
    assert tree_allclose(bptt_default[1], bptt_mean[1], rtol=0)
    assert tree_allclose(bptt_mean[1], jtu.tree_map(lambda g: g / LENGTH, bptt_sum[1]))
    # RTRL is exact: its mean equals BPTT's.
    assert tree_allclose(mean[1], bptt_mean[1], rtol=1e-8)


@pytest.mark.parametrize(
    "algorithm, model",
    [
        *[
            pytest.param(
                case.algorithm, nn.GRUCell(INPUT, HIDDEN, key=jr.key(0)), id=f"{case.name}-gru"
            )
            for case in rules(exact=True)
        ],
        # Rules exact for an element-wise layer (D-RTRL), also with the loss on chosen steps.
        *[
            pytest.param(
                case.algorithm,
                LeakyTanh(INPUT, HIDDEN, key=jr.key(0)),
                id=f"{case.name}-elementwise",
            )
            for case in rules(exact_elementwise=True, exact=False)
        ],
    ],
)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_exact_rules_equal_bptt_with_a_loss_on_the_last_step(algorithm, model, reduction):
    params, step, forward, state, trace = _setup(algorithm, model)
    xs, label = _data()
    last = jnp.arange(LENGTH) == LENGTH - 1
    options = dict(reduction=reduction, step_weights=last, sequence_targets=True)
    loss, online, _, _ = eqtrace.online_gradient(
        step, mse, params, state, trace, xs, label, **options
    )
    bptt_loss, bptt, _ = eqtrace.bptt_gradient(forward, mse, params, state, xs, label, **options)
    assert jnp.allclose(loss, bptt_loss, rtol=1e-12)
    assert tree_allclose(online, bptt, rtol=1e-8, atol=1e-14)
    # Only the last step carries a loss: the same as a loss at the last output alone.
    ys, _, _ = eqtrace.run_online(step, params, state, trace, xs)
    assert jnp.allclose(loss, mse(ys[-1], label), rtol=1e-12)


def test_truncated_bptt_options():
    model = nn.GRUCell(INPUT, HIDDEN, key=jr.key(0))
    params, _, forward, state, _ = _setup(eqtrace.RTRL(), model)
    xs, label = _data()
    broadcast = jnp.broadcast_to(label, (LENGTH, *label.shape))
    expected_loss, expected, _ = eqtrace.truncated_bptt_gradient(
        forward, _flagged_loss, params, state, xs, (broadcast, WEIGHTS), 3, reduction="sum"
    )
    loss, grads, _ = eqtrace.truncated_bptt_gradient(
        forward, mse, params, state, xs, label, 3, reduction="mean",
        step_weights=WEIGHTS, sequence_targets=True,
    )  # fmt: skip
    total = jnp.sum(WEIGHTS)
    assert jnp.allclose(loss, expected_loss / total, rtol=1e-12)
    assert tree_allclose(grads, jtu.tree_map(lambda g: g / total, expected), rtol=1e-12)
    # A window as long as the sequence is BPTT, with the same options.
    _, bptt, _ = eqtrace.bptt_gradient(
        forward, mse, params, state, xs, label, reduction="mean",
        step_weights=WEIGHTS, sequence_targets=True,
    )  # fmt: skip
    _, whole, _ = eqtrace.truncated_bptt_gradient(
        forward, mse, params, state, xs, label, LENGTH, reduction="mean",
        step_weights=WEIGHTS, sequence_targets=True,
    )  # fmt: skip
    assert tree_allclose(whole, bptt, rtol=1e-12)


@pytest.mark.parametrize("block_size", [None, 7])
def test_train_online_with_a_loss_on_the_last_step(block_size):
    """With plain SGD, steps of weight zero leave the parameters unchanged, so one update at
    the last step equals a step of SGD on the online gradient of the last step's loss."""
    model = nn.GRUCell(INPUT, HIDDEN, key=jr.key(0))
    algorithm = eqtrace.DRTRL()
    params, step, _, state, trace = _setup(algorithm, model, block=block_size is not None)
    xs, label = _data()
    last = jnp.arange(LENGTH) == LENGTH - 1
    sgd = optax.sgd(0.1)
    new_params, _, _, _, losses = eqtrace.train_online(
        step, mse, sgd, params, sgd.init(params), state, trace, xs, label,
        block_size=block_size, step_weights=last, sequence_targets=True,
    )  # fmt: skip
    _, grads, _, _ = eqtrace.online_gradient(
        step, mse, params, state, trace, xs, label, block_size=block_size,
        step_weights=last, sequence_targets=True, reduction="sum",
    )  # fmt: skip
    if block_size is not None:
        grads = jtu.tree_map(lambda g: g / block_size, grads)  # one update: the block's mean
    expected = jtu.tree_map(lambda p, g: p - 0.1 * g, params, grads)
    assert tree_allclose(new_params, expected, rtol=1e-10)
    # The losses are `loss_fn`'s values at every step, before weighting.
    ys, _, _ = eqtrace.run_online(_setup(algorithm, model)[1], params, state, trace, xs)
    assert losses.shape == (LENGTH,)
    assert jnp.allclose(losses, jax.vmap(mse, in_axes=(0, None))(ys, label), rtol=1e-10)


def test_mean_over_zero_weights_is_an_error():
    model = nn.GRUCell(INPUT, HIDDEN, key=jr.key(0))
    params, step, _, state, trace = _setup(eqtrace.RTRL(), model)
    xs, label = _data()
    with pytest.raises(Exception, match="sum of `step_weights`, but it is zero"):
        eqtrace.online_gradient(
            step, mse, params, state, trace, xs, label, reduction="mean",
            step_weights=jnp.zeros(LENGTH), sequence_targets=True,
        )  # fmt: skip


def test_train_online_last_block_takes_the_remainder():
    """`block_size` means the same as in `online_gradient`: 7 steps in blocks of 4 are one
    update on the first 4 steps' mean online gradient, then one on the last 3 steps'."""
    model = nn.GRUCell(INPUT, HIDDEN, key=jr.key(0))
    algorithm = eqtrace.DRTRL()
    params, block, _, state, trace = _setup(algorithm, model, block=True)
    xs, label = _data()
    sgd = optax.sgd(0.1)
    trained, _, final_state, _, losses = eqtrace.train_online(
        block, mse, sgd, params, sgd.init(params), state, trace, xs, label,
        block_size=4, sequence_targets=True,
    )  # fmt: skip
    expected, expected_state, expected_trace = params, state, trace
    for start, stop in [(0, 4), (4, LENGTH)]:
        _, grads, expected_state, expected_trace = eqtrace.online_gradient(
            block, mse, expected, expected_state, expected_trace, xs[start:stop],
            label, block_size=4, sequence_targets=True, reduction="mean",
        )  # fmt: skip
        expected = jtu.tree_map(lambda p, g: p - 0.1 * g, expected, grads)
    assert tree_allclose(trained, expected, rtol=1e-10)
    assert tree_allclose(final_state, expected_state, rtol=1e-10)
    assert losses.shape == (LENGTH,)


def test_a_sequence_of_no_steps_sums_to_zero():
    """T = 0 with `reduction="sum"`: zero loss and gradients, the state and trace unchanged,
    in every driver, stepped, in blocks and in windows (a mean over no steps is refused: see
    test_errors.py)."""
    model = nn.GRUCell(INPUT, HIDDEN, key=jr.key(0))
    params, step, forward, state, trace = _setup(eqtrace.RTRL(), model)
    _, block, _, _, _ = _setup(eqtrace.RTRL(), model, block=True)
    xs, targets = jnp.zeros((0, BATCH, INPUT)), jnp.zeros((0, BATCH, HIDDEN))
    zeros = jtu.tree_map(jnp.zeros_like, params)
    sgd = optax.sgd(0.1)
    results = [
        eqtrace.online_gradient(step, mse, params, state, trace, xs, targets, reduction="sum"),
        eqtrace.online_gradient(
            block, mse, params, state, trace, xs, targets, block_size=2, reduction="sum"
        ),
        eqtrace.bptt_gradient(forward, mse, params, state, xs, targets, reduction="sum"),
        eqtrace.truncated_bptt_gradient(
            forward, mse, params, state, xs, targets, 2, reduction="sum"
        ),
    ]
    for loss, grads, *_ in results:
        assert loss == 0 and tree_allclose(grads, zeros, rtol=0, atol=0)
    for online, block_size in [(step, None), (block, 2)]:
        new_params, _, new_state, new_trace, losses = eqtrace.train_online(
            online, mse, sgd, params, sgd.init(params), state, trace, xs, targets,
            block_size=block_size,
        )  # fmt: skip
        assert losses.shape == (0,)
        assert tree_allclose((new_params, new_state, new_trace), (params, state, trace), rtol=0)
