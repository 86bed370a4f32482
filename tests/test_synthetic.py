"""Synthetic gradients (`eqtrace.synthetic_gradient`, `eqtrace.train_synthetic`) in float64:
with the true future cotangent as the prediction they are BPTT (and the bootstrapped targets are
that cotangent, so the fitting loss is zero); with a zero predictor, truncated BPTT; any
predictor follows the definition written out naively; a batch is its samples; jit is no jit;
training updates once per window; and the fitting loss falls on the copy task."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
import pytest

import eqtrace
from eqtrace import nn
from helpers import LONG, normal, relative_error, squared_loss


INPUT, HIDDEN, BATCH = 3, 4, 2


class _Counting(eqtrace.AbstractCell):
    """A leaky tanh cell whose state also counts its steps (an integer leaf, which carries no
    cotangent and which the predictor skips)."""

    weight: jax.Array
    recurrent: jax.Array

    def __init__(self, *, key):
        k1, k2 = jr.split(key)
        self.weight = jr.normal(k1, (HIDDEN, INPUT)) / 2
        self.recurrent = jr.normal(k2, (HIDDEN, HIDDEN)) / 2

    def init_state(self):
        return (jnp.zeros(HIDDEN), jnp.zeros((), jnp.int32))

    def __call__(self, state, x):
        h, count = state
        h = 0.5 * h + jnp.tanh(self.weight @ x + self.recurrent @ h)
        return (h, count + 1), h

    def output(self, state):
        return state[0]


def _model(key, kind="gru"):
    if kind == "counting":
        return _Counting(key=key)
    k1, k2 = jr.split(key)
    return nn.Sequential([nn.GRUCell(INPUT, HIDDEN, key=k1), eqx.nn.Linear(HIDDEN, 2, key=k2)])


def _problem(key, rng, length, kind="gru", batch=()):
    model = _model(key, kind)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    out = 2 if kind == "gru" else HIDDEN
    xs, targets = normal(rng, (length, *batch, INPUT)), normal(rng, (length, *batch, out))
    return model, params, static, xs, targets


def _boundaries(length, window):
    return list(range(0, length, window)) + [length]


@eqx.filter_jit
def _future_cotangents(static, params, state, xs, targets, window):
    """`dL_{>n}/dh_n` at each window's exit `h_n`, by BPTT over the whole sequence: the
    gradient of the total loss with respect to a perturbation added to `h_n` after its step's
    loss (so that only the later steps see it). Also the exit states."""
    forward = eqx.combine(params, static)
    edges = _boundaries(len(xs), window)

    def total(perturbations):
        h, loss, exits = state, 0.0, []
        for n, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            for t in range(a, b):
                h, y = forward(h, xs[t])
                loss = loss + squared_loss(y, targets[t])
            exits.append(h)
            h = (h[0] + perturbations[n], *h[1:]) if isinstance(h, tuple) else h + perturbations[n]
        return loss, exits

    zeros = [jnp.zeros(HIDDEN) for _ in edges[:-1]]
    cotangents, exits = jax.grad(total, has_aux=True)(zeros)
    return cotangents, exits


def _exact_predictor(model, exits, cotangents):
    """A linear predictor that gives exactly `cotangents[n]` at `exits[n]` (for linearly
    independent exit states no more than the state's size): `A = G H⁺`."""
    floats = lambda h: h[0] if isinstance(h, tuple) else h  # noqa: E731
    H = jnp.stack([floats(h) for h in exits], axis=1)
    G = jnp.stack(cotangents, axis=1)
    predictor = eqtrace.SyntheticGradient(model)
    weight = G @ jnp.linalg.pinv(H)
    assert relative_error(weight @ H, G) <= 1e-10  # the predictions are the cotangents
    return eqx.tree_at(lambda p: p.weight, predictor, weight)


@pytest.mark.parametrize("kind", ["gru", "counting"])
def test_true_future_cotangent_is_bptt(kind, getkey, rng):
    """With the true future cotangent at every exit, the windows' gradient is BPTT's, and each
    window's bootstrapped target is the true cotangent at its entry: the fitting loss is 0."""
    length, window = 9, 3  # two interior exits, fitted by an exact linear predictor
    model, params, static, xs, targets = _problem(getkey(), rng, length, kind)
    state = model.init_state()
    cotangents, exits = _future_cotangents(static, params, state, xs, targets, window)
    predictor = _exact_predictor(model, exits[:-1], cotangents[:-1])
    forward = eqtrace.make_forward_step(static)
    loss, grads, fit_loss, _, final = eqtrace.synthetic_gradient(
        forward, squared_loss, params, predictor, state, xs, targets, window, reduction="sum"
    )
    bptt_loss, bptt, bptt_final = eqtrace.bptt_gradient(
        forward, squared_loss, params, state, xs, targets, reduction="sum"
    )
    assert relative_error(grads, bptt) <= 1e-12
    assert relative_error((loss, final), (bptt_loss, bptt_final)) <= 1e-12
    assert float(fit_loss) <= 1e-24
    # The windows alone (a zero predictor) are truncated BPTT, which misses the future.
    zero = eqtrace.SyntheticGradient(model)
    _, truncated, *_ = eqtrace.synthetic_gradient(
        forward, squared_loss, params, zero, state, xs, targets, window, reduction="sum"
    )
    assert relative_error(truncated, bptt) > 1e-3
    expected = eqtrace.truncated_bptt_gradient(
        forward, squared_loss, params, state, xs, targets, window, reduction="sum"
    )
    assert relative_error(truncated, expected[1]) <= 1e-12


def test_zero_predictor_is_truncated_bptt(getkey, rng):
    """An untrained (zero) predictor injects nothing: truncated BPTT, a last shorter window
    taking the remainder, with step weights."""
    model, params, static, xs, targets = _problem(getkey(), rng, 7)
    forward = eqtrace.make_forward_step(static)
    weights = jnp.asarray(rng.uniform(size=7))
    args = (forward, squared_loss, params)
    data = (model.init_state(), xs, targets, 3)
    predictor = eqtrace.SyntheticGradient(model)
    loss, grads, *_, final = eqtrace.synthetic_gradient(
        *args, predictor, *data, step_weights=weights
    )
    expected = eqtrace.truncated_bptt_gradient(*args, *data, step_weights=weights)
    assert relative_error((loss, grads, final), expected) <= 1e-12


def _window_reference(static, params, predictor, entry, xs, targets, inject):
    """One window by its definition, unrolled in Python: `jax.grad` of its losses plus
    `⟨ĝ(h_exit), h_exit⟩` (held constant) with respect to the parameters and to the entry
    state's floating part `entry[0]`.

    **Returns:** `(grads, target, exit_state)`."""

    def window_loss(params, h0):
        forward = eqx.combine(params, static)
        h, loss = (h0, *entry[1:]), 0.0
        for x, target in zip(xs, targets):
            h, y = forward(h, x)
            loss = loss + squared_loss(y, target)
        if inject:
            loss = loss + jnp.vdot(jax.lax.stop_gradient(predictor(h)[0]), h[0])
        return loss, h

    (grads, target), exit_state = jax.grad(window_loss, argnums=(0, 1), has_aux=True)(
        params, entry[0]
    )
    return grads, target, exit_state


def _fitting_reference(predictor, entry, target):
    """`½‖ĝ(h_entry) − target‖²` and its gradient with respect to the predictor."""
    return jax.value_and_grad(lambda p: 0.5 * jnp.sum((p(entry)[0] - target) ** 2))(predictor)


@eqx.filter_jit
def _reference(static, params, predictor, state, xs, targets, window, starts, ends, sgd=None):
    """The sum over the windows of `_window_reference`, and of the fitting losses; with `sgd`
    (a learning rate), an SGD update of the pair after every window instead (the parameters
    with the mean over the window's steps)."""
    edges = _boundaries(len(xs), window)
    count = len(edges) - 1
    grads = jtu.tree_map(jnp.zeros_like, params)
    fit, fit_grads, fits = 0.0, jtu.tree_map(jnp.zeros_like, predictor), []
    h = state
    for n, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        inject = n < count - 1 or not ends
        g, target, exit_state = _window_reference(
            static, params, predictor, h, xs[a:b], targets[a:b], inject
        )
        value, pg = _fitting_reference(predictor, h, target)
        if n == 0 and starts:
            value, pg = 0.0 * value, jtu.tree_map(jnp.zeros_like, pg)
        fits.append(value)
        if sgd is None:
            grads = jtu.tree_map(jnp.add, grads, g)
            fit, fit_grads = fit + value, jtu.tree_map(jnp.add, fit_grads, pg)
        else:
            g = jtu.tree_map(lambda a_: a_ / (b - a), g)
            params, predictor = jtu.tree_map(lambda p, d: p - sgd * d, (params, predictor), (g, pg))
        h = exit_state
    if sgd is not None:
        return params, predictor, jnp.stack(fits)
    return grads, fit, fit_grads, h


@pytest.mark.parametrize(
    "kind, length, window, starts, ends",
    [
        ("gru", 7, 3, True, True),
        ("counting", 6, 2, False, False),
        *([("gru", 5, 2, True, False)] if LONG else []),  # the other flags' mix
    ],
)
def test_windows_follow_their_definition(kind, length, window, starts, ends, getkey, rng):
    model, params, static, xs, targets = _problem(getkey(), rng, length, kind)
    predictor = eqtrace.SyntheticGradient(model, key=getkey(), scale=0.7)
    predictor = eqx.tree_at(lambda p: p.bias, predictor, normal(rng, (HIDDEN,)))
    state = jtu.tree_map(
        lambda a: normal(rng, a.shape) if eqx.is_inexact_array(a) else a, model.init_state()
    )
    _, grads, fit, fit_grads, final = eqtrace.synthetic_gradient(
        eqtrace.make_forward_step(static),
        squared_loss,
        params,
        predictor,
        state,
        xs,
        targets,
        window,
        reduction="sum",
        sequence_starts=starts,
        sequence_ends=ends,
    )
    expected = _reference(static, params, predictor, state, xs, targets, window, starts, ends)
    assert relative_error((grads, fit, fit_grads, final), expected) <= 1e-11
    assert float(fit) > 0


def _batch_loss(y, target):
    return squared_loss(y, target) / BATCH


def _gradient(static, params, predictor, state, xs, targets, batched, jit=True):
    forward = eqtrace.make_forward_step(static)
    if batched:
        forward = jax.vmap(forward, in_axes=(None, 0, 0))
    # Without jit: the driver's own code, op by op (its scans compile their bodies).
    driver = eqtrace.synthetic_gradient if jit else eqtrace.synthetic_gradient.__wrapped__
    return driver(forward, _batch_loss, params, predictor, state, xs, targets, 2, reduction="sum")


def test_batch_is_its_samples_and_jit_is_no_jit(getkey, rng):
    """A vmapped batch (one predictor, vmapped over the samples) equals the sum over its
    samples run one by one with the same `loss_fn` (so that the cotangents, and the
    predictions of them, are in the same units); jitted equals op by op."""
    model, params, static, xs, targets = _problem(getkey(), rng, 4, batch=(BATCH,))
    predictor = eqtrace.SyntheticGradient(model, key=getkey(), scale=0.7)
    state = (normal(rng, (BATCH, HIDDEN)), None)
    batched = _gradient(static, params, predictor, state, xs, targets, True)
    samples = [
        _gradient(static, params, predictor, (state[0][b], None), xs[:, b], targets[:, b], False)
        for b in range(BATCH)
    ]
    summed = jtu.tree_map(lambda *a: sum(a), *[s_[:4] for s_ in samples])
    stacked = jtu.tree_map(lambda *a: jnp.stack(a), *[s_[4] for s_ in samples])
    assert relative_error(batched, (*summed, stacked)) <= 1e-11
    assert float(batched[2]) > 0
    eager = _gradient(static, params, predictor, state, xs, targets, True, jit=False)
    assert relative_error(eager, batched) <= 1e-11


def test_train_synthetic_updates_once_per_window(getkey, rng):
    """`train_synthetic` updates the pair `(params, predictor)` after every window with that
    window's gradients (its steps' mean for the parameters), each window from the state the
    previous one left, a last shorter window taking the remainder."""
    model, params, static, xs, targets = _problem(getkey(), rng, 5)
    predictor = eqtrace.SyntheticGradient(model, key=getkey(), scale=0.7)
    optimizer = optax.sgd(0.1)
    state = model.init_state()
    trained = eqtrace.train_synthetic(
        eqtrace.make_forward_step(static), squared_loss, optimizer, params, predictor,
        optimizer.init((params, predictor)), state, xs, targets, 2,
    )  # fmt: skip
    expected = _reference(static, params, predictor, state, xs, targets, 2, True, True, sgd=0.1)
    assert relative_error((trained[0], trained[1], trained[5]), expected) <= 1e-11
    assert trained[4].shape == (5,)
    assert relative_error(trained[0], params) > 1e-3  # it trained


def test_fitting_loss_falls_on_the_copy_task(getkey):
    """On the copy task (GRU held fixed, so that the targets do not move), 150 updates of the
    predictor (100 of them fitted: the first window of a sequence is not) by its bootstrapped
    targets lower its fitting loss to under half."""
    n_symbols, batch, hidden, window = 2, 16, 8, 3
    task = dict(length=2, delay=4, n_symbols=n_symbols)  # T = 9: three windows
    k1, k2 = jr.split(getkey())
    model = nn.Sequential(
        [nn.GRUCell(n_symbols + 2, hidden, key=k1), eqx.nn.Linear(hidden, n_symbols + 1, key=k2)]
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    state = (jnp.zeros((batch, hidden)), None)

    def loss_fn(y, labels):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(y, labels))

    predictor = eqtrace.SyntheticGradient(model)
    labels = (jtu.tree_map(lambda _: "held", params), jtu.tree_map(lambda _: "fit", predictor))
    optimizer = optax.multi_transform(
        {"held": optax.set_to_zero(), "fit": optax.adam(0.02)}, labels
    )

    @eqx.filter_jit
    def train(predictor, opt_state, key):
        xs, targets, _ = eqtrace.tasks.copy_task(key, batch, **task)
        _, predictor, opt_state, _, _, fits = eqtrace.train_synthetic(
            forward, loss_fn, optimizer, params, predictor, opt_state, state, xs, targets, window
        )
        return predictor, opt_state, fits[1:]

    opt_state = optimizer.init((params, predictor))
    fits = []
    for i in range(50):  # three windows per batch: 150 updates, 100 of them fitted
        predictor, opt_state, fit = train(predictor, opt_state, jr.key(i))
        fits.append(fit)
    fits = jnp.stack(fits)
    first, last = float(jnp.mean(fits[:5])), float(jnp.mean(fits[-5:]))
    assert last < 0.5 * first, (first, last)
