"""The foundation: exact RTRL against BPTT, the drivers, jit/vmap behaviour and argument checks."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray

import eqtrace
from helpers import (
    normal,
    online_and_bptt,
    output_shape,
    random_sequence,
    random_state,
    relative_error,
    squared_loss,
    tree_allclose,
    unstack,
)
from registry import algorithms


INPUT, HIDDEN, LENGTH = 3, 4, 6


class LeakyTanhCell(eqtrace.AbstractCell):
    """A user-defined cell with two state leaves and plain `eqx.nn.Linear` ops:
    `v_t = α ⊙ v_{t-1} + (1 - α) ⊙ (W_x x_t + W_h h_{t-1} + b)`, `h_t = tanh(v_t)`, with a
    learnable per-neuron leak `α = σ(leak_logit)`."""

    input_op: eqx.nn.Linear
    recurrent_op: eqx.nn.Linear
    leak_logit: Float[Array, " hidden"]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, input_size: int, hidden_size: int, *, key: PRNGKeyArray):
        ikey, rkey, lkey = jr.split(key, 3)
        self.input_op = eqx.nn.Linear(input_size, hidden_size, key=ikey)
        self.recurrent_op = eqx.nn.Linear(hidden_size, hidden_size, use_bias=False, key=rkey)
        self.leak_logit = jr.normal(lkey, (hidden_size,))
        self.input_size = input_size
        self.hidden_size = hidden_size

    def init_state(self):
        zeros = jnp.zeros(self.hidden_size)
        return {"v": zeros, "h": zeros}

    def __call__(self, state, x):
        alpha = jax.nn.sigmoid(self.leak_logit)
        drive = self.input_op(x) + self.recurrent_op(state["h"])
        v = alpha * state["v"] + (1 - alpha) * drive
        new_state = {"v": v, "h": jnp.tanh(v)}
        return new_state, self.output(new_state)

    def output(self, state):
        return state["h"]


class _OneStepTrace(eqx.Module):
    jacobian: Float[Array, "state params"]


class OneStepRTRL(eqtrace.AbstractAlgorithm):
    """RTRL whose sensitivity forgets the past, `M_t = J^θ_t`: a user-defined algorithm whose
    online gradient is truncated BPTT with a window of one step."""

    per_layer: ClassVar[bool] = False
    check_finite: bool = False

    def init_cell_trace(self, cell, state, x):
        return _OneStepTrace(eqtrace.RTRL().init_cell_trace(cell, state, x).jacobian)

    def cell_step(self, cell, state, trace, x):
        fresh = eqtrace.RTRLTrace(jnp.zeros_like(trace.jacobian))
        new_state, new_trace = eqtrace.RTRL().cell_step(cell, state, fresh, x)
        return new_state, _OneStepTrace(new_trace.jacobian)

    def cell_tangent(self, cell, state, trace, x, params_tangent):
        full = eqtrace.RTRLTrace(trace.jacobian)
        return eqtrace.RTRL().cell_tangent(cell, state, full, x, params_tangent)


def make_model(name: str, key: PRNGKeyArray):
    k1, k2, k3 = jr.split(key, 3)
    if name == "rnn":
        return eqtrace.nn.RNNCell(INPUT, HIDDEN, key=k1)
    if name == "gru":
        return eqtrace.nn.GRUCell(INPUT, HIDDEN, key=k1)
    if name == "leaky":
        return LeakyTanhCell(INPUT, HIDDEN, key=k1)
    if name == "two_layer":
        return eqtrace.nn.Sequential(
            [
                eqtrace.nn.GRUCell(INPUT, HIDDEN, key=k1),
                eqtrace.nn.RNNCell(HIDDEN, HIDDEN, key=k2),
                eqx.nn.Linear(HIDDEN, 2, key=k3),
            ]
        )
    raise ValueError(name)


MODELS = ["rnn", "gru", "leaky", "two_layer"]


def batch_mean(loss_fn):
    return lambda ys, targets: jnp.mean(jax.vmap(loss_fn)(ys, targets))


def scan_outputs(model, state, xs):
    """The plain forward pass over time: no eqtrace machinery at all."""

    def body(state, x):
        return model(state, x)

    return jax.lax.scan(body, state, xs)


@pytest.mark.parametrize("algorithm", algorithms(exact=True))
@pytest.mark.parametrize("name", MODELS)
def test_exact_rule_equals_bptt(name, algorithm, getkey, rng):
    model = make_model(name, getkey())
    xs, targets = random_sequence(rng, model, LENGTH, INPUT)
    # From a generic state (the zero initial state is covered by the batch test below): with
    # h_0 = 0 some terms of the first step vanish and could hide a wrong recurrence.
    state = random_state(rng, model)
    online, bptt = online_and_bptt(algorithm, model, xs, targets, state=state)
    assert relative_error(online, bptt) <= 1e-9
    # Every parameter, the read-out's included, gets a non-zero gradient.
    for leaf in jtu.tree_leaves(online):
        assert np.all(np.asarray(leaf) != 0)


# For the exact rules: test_diagonal.py holds the others to the batch = loop oracle.
@pytest.mark.parametrize("algorithm", algorithms(exact=True))
def test_exact_rule_batch_equals_loop_and_bptt(algorithm, getkey, rng):
    batch = 3
    model = make_model("two_layer", getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    online_step = eqtrace.make_online_step(algorithm, static)
    batched_step = jax.vmap(online_step, in_axes=(None, 0, 0, 0))
    xs, targets = random_sequence(rng, model, LENGTH, INPUT, (batch,))
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=batch)
    mean_loss = batch_mean(squared_loss)

    loss, batched, _, _ = eqtrace.online_gradient(
        batched_step, mean_loss, params, state, trace, xs, targets, reduction="sum"
    )

    state0, trace0 = eqtrace.init_state_and_trace(model, algorithm)
    per_sample = [
        eqtrace.online_gradient(
            online_step, squared_loss, params, state0, trace0, x, target, reduction="sum"
        )
        for x, target in zip(unstack(xs.swapaxes(0, 1)), unstack(targets.swapaxes(0, 1)))
    ]
    loop_loss = sum(out[0] for out in per_sample) / batch
    loop_grads = jtu.tree_map(lambda *g: sum(g) / batch, *(out[1] for out in per_sample))
    assert np.allclose(loss, loop_loss, rtol=1e-12)
    assert relative_error(batched, loop_grads) <= 1e-9

    forward_step = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    bptt_loss, bptt, _ = eqtrace.bptt_gradient(
        forward_step, mean_loss, params, state, xs, targets, reduction="sum"
    )
    assert np.allclose(loss, bptt_loss, rtol=1e-12)
    assert relative_error(batched, bptt) <= 1e-9


def test_bptt_matches_finite_differences(getkey, rng):
    model = eqtrace.nn.RNNCell(INPUT, HIDDEN, key=getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    xs, targets = random_sequence(rng, model, 4, INPUT)
    state = random_state(rng, model)
    _, grads, _ = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(static), squared_loss, params, state, xs, targets, reduction="sum"
    )

    theta, unravel = ravel_pytree(params)

    @jax.jit
    @jax.vmap
    def loss(theta):
        _, ys = scan_outputs(eqx.combine(unravel(theta), static), state, xs)
        return jnp.sum(jax.vmap(squared_loss)(ys, targets))

    eps = 1e-5
    basis = eps * jnp.eye(theta.size)
    fd = (loss(theta[None] + basis) - loss(theta[None] - basis)) / (2 * eps)
    assert relative_error(ravel_pytree(grads)[0], fd) <= 1e-7


def _truncated(model, xs, targets, window, state=None):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = model.init_state() if state is None else state
    return eqtrace.truncated_bptt_gradient(
        eqtrace.make_forward_step(static),
        squared_loss,
        params,
        state,
        xs,
        targets,
        window,
        reduction="sum",
    )


def test_truncated_bptt_long_window_is_bptt(getkey, rng):
    model = make_model("gru", getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    xs, targets = random_sequence(rng, model, LENGTH, INPUT)
    state = random_state(rng, model)
    bptt_loss, bptt, bptt_final = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(static), squared_loss, params, state, xs, targets, reduction="sum"
    )
    for window in [LENGTH, LENGTH + 3]:
        loss, grads, final = _truncated(model, xs, targets, window, state)
        assert np.allclose(loss, bptt_loss, rtol=1e-12)
        assert relative_error(grads, bptt) <= 1e-12
        assert tree_allclose(final, bptt_final, rtol=1e-12)


def test_truncated_bptt_window_one_is_sum_of_one_step_gradients(getkey, rng):
    model = make_model("gru", getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward_step = eqtrace.make_forward_step(static)
    xs, targets = random_sequence(rng, model, LENGTH, INPUT)
    loss, grads, final = _truncated(model, xs, targets, 1)

    @jax.jit
    def one_step_grad(params, state, x, target):
        state = jax.lax.stop_gradient(state)
        return jax.grad(lambda p: squared_loss(forward_step(p, state, x)[1], target))(params)

    state = model.init_state()
    expected = jtu.tree_map(jnp.zeros_like, params)
    for x, target in zip(unstack(xs), unstack(targets)):
        expected = jtu.tree_map(jnp.add, expected, one_step_grad(params, state, x, target))
        state, _ = forward_step(params, state, x)
    assert relative_error(grads, expected) <= 1e-12
    assert tree_allclose(final, state, rtol=1e-12)

    # A user-defined online rule that forgets the past gives the same gradient online.
    online, _ = online_and_bptt(OneStepRTRL(), model, xs, targets)
    assert relative_error(online, expected) <= 1e-9


def test_truncated_bptt_uneven_windows(getkey, rng):
    length, window = 7, 3
    model = make_model("gru", getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward_step = eqtrace.make_forward_step(static)
    xs, targets = random_sequence(rng, model, length, INPUT)
    loss, grads, final = _truncated(model, xs, targets, window)

    state = model.init_state()
    expected_loss, expected = 0.0, jtu.tree_map(jnp.zeros_like, params)
    for start in range(0, length, window):
        piece = slice(start, start + window)
        piece_loss, piece_grads, state = eqtrace.bptt_gradient(
            forward_step, squared_loss, params, state, xs[piece], targets[piece], reduction="sum"
        )
        expected_loss += piece_loss
        expected = jtu.tree_map(jnp.add, expected, piece_grads)
    assert np.allclose(loss, expected_loss, rtol=1e-12)
    assert relative_error(grads, expected) <= 1e-12
    assert tree_allclose(final, state, rtol=1e-12)


def test_truncated_bptt_rejects_empty_window(getkey, rng):
    model = make_model("rnn", getkey())
    xs, targets = random_sequence(rng, model, LENGTH, INPUT)
    with pytest.raises(ValueError, match="`window` must be >= 1"):
        _truncated(model, xs, targets, 0)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_run_online_outputs_equal_plain_scan(batch, getkey, rng):
    model = make_model("two_layer", getkey())
    algorithm = eqtrace.RTRL()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    online_step = eqtrace.make_online_step(algorithm, static)
    forward = model
    if batch:
        online_step = jax.vmap(online_step, in_axes=(None, 0, 0, 0))
        forward = jax.vmap(model)
    xs, _ = random_sequence(rng, model, LENGTH, INPUT, batch)
    state, trace = eqtrace.init_state_and_trace(
        model, algorithm, batch_size=batch[0] if batch else None
    )
    ys, final, _ = eqtrace.run_online(online_step, params, state, trace, xs)
    expected_final, expected_ys = jax.lax.scan(lambda s, x: forward(s, x), state, xs)
    assert tree_allclose(ys, expected_ys, rtol=1e-12)
    assert tree_allclose(final, expected_final, rtol=1e-12)


def _delayed_copy_task(rng, batch, length):
    """Output, at each step, the first input channel of the previous step."""
    xs = normal(rng, (length, batch, INPUT))
    previous = jnp.concatenate([jnp.zeros((1, batch)), xs[:-1, :, 0]])
    return xs, previous[..., None]


@eqx.filter_jit
def _evaluate(model, xs, targets):
    state = jax.vmap(lambda _: model.init_state())(jnp.arange(xs.shape[1]))
    _, ys = jax.lax.scan(lambda s, x: jax.vmap(model)(s, x), state, xs)
    return jnp.mean((ys - targets) ** 2)


@pytest.mark.parametrize("every_k", [1, 2])
def test_train_online_decreases_loss(every_k, getkey, rng):
    batch, length, epochs = 16, 8, 60
    k1, k2 = jr.split(getkey())
    model = eqtrace.nn.Sequential(
        [eqtrace.nn.GRUCell(INPUT, HIDDEN, key=k1), eqx.nn.Linear(HIDDEN, 1, key=k2)]
    )
    algorithm = eqtrace.RTRL()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    optimizer = optax.adam(3e-2)
    if every_k > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=every_k)
    opt_state = optimizer.init(params)
    xs, targets = _delayed_copy_task(rng, batch, length)
    mean_loss = batch_mean(squared_loss)

    before = _evaluate(model, xs, targets)
    first_losses = None
    for _ in range(epochs):
        state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=batch)
        params, opt_state, _, _, losses = eqtrace.train_online(
            step, mean_loss, optimizer, params, opt_state, state, trace, xs, targets
        )
        first_losses = losses if first_losses is None else first_losses
    after = _evaluate(eqx.combine(params, static), xs, targets)
    assert losses.shape == (length,)
    assert jnp.mean(losses) < 0.5 * jnp.mean(first_losses)
    assert after < 0.5 * before


def test_train_online_multisteps_applies_mean_gradient_every_k(getkey, rng):
    k = 4
    model = make_model("rnn", getkey())
    algorithm = eqtrace.RTRL()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    step = eqtrace.make_online_step(algorithm, static)
    xs, targets = random_sequence(rng, model, k, INPUT)
    state, trace = eqtrace.init_state_and_trace(model, algorithm)
    optimizer = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=k)

    # After k steps: one Adam step on the mean of the k online gradients, all taken at the
    # initial parameters. (Matching this also shows that nothing was applied before step k:
    # an earlier update would have changed the later gradients.)
    new_params, opt_state, *_ = eqtrace.train_online(
        step, squared_loss, optimizer, params, optimizer.init(params), state, trace, xs, targets
    )
    _, summed, _, _ = eqtrace.online_gradient(
        step, squared_loss, params, state, trace, xs, targets, reduction="sum"
    )
    adam = optax.adam(1e-2)
    updates, _ = adam.update(jtu.tree_map(lambda g: g / k, summed), adam.init(params), params)
    expected = optax.apply_updates(params, updates)
    assert relative_error(new_params, expected) <= 1e-9
    assert opt_state.gradient_step == 1
    assert not tree_allclose(new_params, params, rtol=1e-6)


# For the exact rules: test_diagonal.py holds the others to the same oracle.
@pytest.mark.parametrize("algorithm", algorithms(exact=True))
def test_jit_equals_no_jit(algorithm, getkey, rng):
    model = make_model("gru", getkey())
    state = random_state(rng, model)
    trace = algorithm.init_trace(model, state)
    xs, targets = random_sequence(rng, model, 2, INPUT)

    def loss_and_carry(model, state, trace, x, target):
        state, trace, y = algorithm.step(model, state, trace, x)
        return squared_loss(y, target), (state, trace, y)

    eager = eqx.filter_value_and_grad(loss_and_carry, has_aux=True)
    jitted = eqx.filter_jit(eager)
    eager_carry = jit_carry = (state, trace)
    for x, target in zip(unstack(xs), unstack(targets)):
        (eager_loss, (*eager_carry, eager_y)), eager_grads = eager(model, *eager_carry, x, target)
        (jit_loss, (*jit_carry, jit_y)), jit_grads = jitted(model, *jit_carry, x, target)
        assert np.allclose(eager_loss, jit_loss, rtol=1e-12)
        assert tree_allclose(eager_y, jit_y, rtol=1e-12)
        assert tree_allclose(eager_carry, jit_carry, rtol=1e-12, atol=1e-14)
        assert relative_error(jit_grads, eager_grads) <= 1e-12


def test_drivers_do_not_retrace(getkey, rng):
    batch = 2
    model = make_model("gru", getkey())
    algorithm = eqtrace.RTRL()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=batch)
    mean_loss = batch_mean(squared_loss)
    optimizer = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
    opt_state = optimizer.init(params)

    online_drivers = {
        "run_online": lambda step, xs, ts: eqtrace.run_online(step, params, state, trace, xs),
        "online_gradient": lambda step, xs, ts: eqtrace.online_gradient(
            step, mean_loss, params, state, trace, xs, ts, reduction="sum"
        ),
        "train_online": lambda step, xs, ts: eqtrace.train_online(
            step, mean_loss, optimizer, params, opt_state, state, trace, xs, ts
        ),
    }
    forward_drivers = {
        "bptt_gradient": lambda step, xs, ts: eqtrace.bptt_gradient(
            step, mean_loss, params, state, xs, ts, reduction="sum"
        ),
        "truncated_bptt_gradient": lambda step, xs, ts: eqtrace.truncated_bptt_gradient(
            step, mean_loss, params, state, xs, ts, 3, reduction="sum"
        ),
    }
    for name, driver in [*online_drivers.items(), *forward_drivers.items()]:
        if name in online_drivers:
            step = eqtrace.make_online_step(algorithm, static)
            in_axes = (None, 0, 0, 0)
        else:
            step = eqtrace.make_forward_step(static)
            in_axes = (None, 0, 0)
        step = eqx.debug.assert_max_traces(step, max_traces=1)
        batched_step = jax.vmap(step, in_axes=in_axes)
        for _ in range(2):  # new values, same shapes
            xs, targets = random_sequence(rng, model, LENGTH, INPUT, (batch,))
            driver(batched_step, xs, targets)
        assert eqx.debug.get_num_traces(step) == 1, name

    # An uneven last window traces the step twice (the scan body and the remainder), once only.
    step = eqx.debug.assert_max_traces(eqtrace.make_forward_step(static), max_traces=2)
    batched_step = jax.vmap(step, in_axes=(None, 0, 0))
    for _ in range(2):
        xs, targets = random_sequence(rng, model, LENGTH, INPUT, (batch,))
        eqtrace.truncated_bptt_gradient(
            batched_step, mean_loss, params, state, xs, targets, 4, reduction="sum"
        )
    assert eqx.debug.get_num_traces(step) == 2


@pytest.mark.parametrize("name", MODELS)
def test_gradient_into_x_is_exact_within_step(name, getkey, rng):
    model = make_model(name, getkey())
    algorithm = eqtrace.RTRL()
    state = random_state(rng, model)
    trace = algorithm.init_trace(model, state)
    x = normal(rng, (INPUT,))
    target = normal(rng, output_shape(model, x))

    @jax.jit
    def online_and_exact(x):
        online = jax.grad(lambda x: squared_loss(algorithm.step(model, state, trace, x)[2], target))
        exact = jax.grad(lambda x: squared_loss(model(state, x)[1], target))
        return online(x), exact(x)

    online, exact = online_and_exact(x)
    assert relative_error(online, exact) <= 1e-12
    assert np.all(np.asarray(online) != 0)


def test_gradient_into_x_through_an_encoder(getkey, rng):
    # The input to the recurrent core comes from a trainable stateless layer: its weights and
    # the raw input both get their exact within-step gradient.
    k1, k2, k3 = jr.split(getkey(), 3)
    model = eqtrace.nn.Sequential(
        [
            eqx.nn.Linear(INPUT, HIDDEN, key=k1),
            eqtrace.nn.GRUCell(HIDDEN, HIDDEN, key=k2),
            eqx.nn.Linear(HIDDEN, 2, key=k3),
        ]
    )
    algorithm = eqtrace.RTRL()
    state = random_state(rng, model)
    trace = algorithm.init_trace(model, state)
    x = normal(rng, (INPUT,))
    target = normal(rng, (2,))

    def online_loss(args):
        model, x = args
        return squared_loss(algorithm.step(model, state, trace, x)[2], target)

    def exact_loss(args):
        model, x = args
        return squared_loss(model(state, x)[1], target)

    def grads(loss):
        return eqx.filter_jit(eqx.filter_grad(loss))((model, x))

    # At the first step from a zero trace, RTRL's parameter gradient is exact as well.
    (online, online_x), (exact, exact_x) = grads(online_loss), grads(exact_loss)
    assert relative_error(online, exact) <= 1e-12
    assert relative_error(online_x, exact_x) <= 1e-12
    # And a whole sequence still matches BPTT.
    xs, targets = random_sequence(rng, model, LENGTH, INPUT)
    online, bptt = online_and_bptt(algorithm, model, xs, targets)
    assert relative_error(online, bptt) <= 1e-9


@pytest.mark.parametrize("name", MODELS)
def test_init_state_and_trace_batch_shapes(name, getkey):
    batch = 5
    model = make_model(name, getkey())
    algorithm = eqtrace.RTRL()
    single_state, single_trace = eqtrace.init_state_and_trace(model, algorithm)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=batch)
    assert jtu.tree_structure(state) == jtu.tree_structure(single_state)
    assert jtu.tree_structure(trace) == jtu.tree_structure(single_trace)
    for single, batched in zip(
        jtu.tree_leaves((single_state, single_trace)), jtu.tree_leaves((state, trace))
    ):
        assert batched.shape == (batch, *single.shape)
        assert batched.dtype == single.dtype
    n_state = ravel_pytree(single_state)[0].size
    n_params = ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0].size
    if name == "two_layer":  # the read-out is outside the traced recurrent core
        n_params -= ravel_pytree(eqx.filter(model.layers[-1], eqx.is_inexact_array))[0].size
    assert trace.jacobian.shape == (batch, n_state, n_params)
    # A vmapped step accepts them and returns the same layout.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    new_state, new_trace, _ = jax.eval_shape(step, params, state, trace, jnp.ones((batch, INPUT)))
    assert tree_allclose(
        jtu.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), (new_state, new_trace)),
        (state, trace),
        rtol=0.0,
    )


def _step_args(getkey):
    model = make_model("gru", getkey())
    algorithm = eqtrace.RTRL()
    state, trace = eqtrace.init_state_and_trace(model, algorithm)
    return model, algorithm, state, trace, jnp.ones(INPUT)


def test_error_state_of_wrong_shape(getkey):
    model, algorithm, _, trace, x = _step_args(getkey)
    with pytest.raises(ValueError, match=r"`state` does not fit the model.*float64\[5\]"):
        algorithm.step(model, jnp.zeros(HIDDEN + 1), trace, x)
    with pytest.raises(ValueError, match=r"`state` does not fit the model"):
        algorithm.init_trace(model, jnp.zeros(HIDDEN + 1))


def test_error_state_of_wrong_structure(getkey):
    model, algorithm, state, trace, x = _step_args(getkey)
    with pytest.raises(ValueError, match=r"`state` does not fit the model"):
        algorithm.step(model, (state, state), trace, x)
    network = make_model("two_layer", getkey())
    net_state, net_trace = eqtrace.init_state_and_trace(network, algorithm)
    with pytest.raises(ValueError, match=r"`state` does not fit the model"):
        algorithm.step(network, net_state[:2], net_trace, x)
    # The state of another model of the same family.
    with pytest.raises(ValueError, match=r"`state` does not fit the model"):
        algorithm.step(network, make_model("leaky", getkey()).init_state(), net_trace, x)


def test_error_batched_state_without_vmap(getkey):
    model, algorithm, _, _, x = _step_args(getkey)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=2)
    with pytest.raises(ValueError, match=r"`state` does not fit the model.*jax\.vmap"):
        algorithm.step(model, state, trace, x)


def test_error_trace_from_another_model(getkey):
    model, algorithm, state, _, x = _step_args(getkey)
    other = eqtrace.nn.GRUCell(INPUT + 1, HIDDEN, key=getkey())
    _, other_trace = eqtrace.init_state_and_trace(other, algorithm)
    with pytest.raises(ValueError, match=r"`trace` does not fit the model.*init_trace"):
        algorithm.step(model, state, other_trace, x)


def test_error_trace_from_another_algorithm(getkey):
    model, algorithm, state, trace, x = _step_args(getkey)
    # Same array shapes, different algorithm: rejected on the trace's type.
    other_trace = OneStepRTRL().init_trace(model, state)
    assert other_trace.jacobian.shape == trace.jacobian.shape
    message = r"`trace` does not fit the model: expected .*RTRLTrace.* received _OneStepTrace"
    with pytest.raises(ValueError, match=message + r".*`RTRL\(\.\.\.\)\.init_trace"):
        algorithm.step(model, state, other_trace, x)
    with pytest.raises(ValueError, match=r"`trace` does not fit the model.*OneStepRTRL"):
        OneStepRTRL().step(model, state, trace, x)


@pytest.mark.parametrize("name", ["gru", "two_layer"])
def test_error_input_of_wrong_shape(name, getkey):
    model = make_model(name, getkey())
    algorithm = eqtrace.RTRL()
    state, trace = eqtrace.init_state_and_trace(model, algorithm)
    with pytest.raises(ValueError, match=r"`x` must be the input of one sample with shape \(3,\)"):
        algorithm.step(model, state, trace, jnp.ones(INPUT + 1))
    # A batch of inputs without `jax.vmap`.
    with pytest.raises(ValueError, match=r"received shape \(2, 3\).*jax\.vmap"):
        algorithm.step(model, state, trace, jnp.ones((2, INPUT)))
