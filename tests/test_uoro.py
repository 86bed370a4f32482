"""UORO against its oracle (docs/architecture.md §3, oracle 4): over many keys, the mean of its
online gradient is RTRL's. Also its recurrence on a hand-computable cell, its keys (one per
sample, independent across a batch, through `vmap`, `scan`, `jit` and `grad`), its trace memory
and its errors. Batch = loop, jit = no jit and blocks = steps run for it with the other rules in
test_diagonal.py and test_blocks.py (UORO has a block computation of its own, `cell_steps`);
here its blocks equal its steps on the cells its block's derivative once failed on, and keep
no step's `θ̃`."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.stats import norm

import eqtrace
from eqtrace import nn
from helpers import LONG, relative_error, squared_loss


LENGTH = 5
#: Keys per model: the two-layer core is much noisier (see the printed variances).
KEYS = {"gru": 2000, "two-layer": 32000}
#: The probability that the statistical test fails although UORO is unbiased, shared over all
#: coordinates (Bonferroni): a false failure about once in a million runs.
FALSE_FAILURE = 1e-6


def _models(key):
    k = jr.split(key, 5)
    return {
        "gru": nn.Sequential([nn.GRUCell(3, 4, key=k[0]), eqx.nn.Linear(4, 2, key=k[1])]),
        # Two recurrent layers: one system for UORO, whose read-out is exact.
        "two-layer": nn.Sequential(
            [nn.RNNCell(3, 3, key=k[2]), nn.GRUCell(3, 3, key=k[3]), eqx.nn.Linear(3, 2, key=k[4])]
        ),
    }


def _uoro_and_rtrl(model, xs, targets, keys):
    """UORO's online gradient for each key (flattened, one row per key) and RTRL's."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def online(algorithm, key=None):
        state, trace = eqtrace.init_state_and_trace(model, algorithm, key=key)
        step = eqtrace.make_online_step(algorithm, static)
        _, grads, _, _ = eqtrace.online_gradient(
            step, squared_loss, params, state, trace, xs, targets, reduction="sum"
        )
        return ravel_pytree(grads)[0]

    # One compilation for all the keys.
    estimates = jax.vmap(lambda key: online(eqtrace.UORO(key=jr.key(0)), key))(keys)
    return np.asarray(estimates), np.asarray(online(eqtrace.RTRL()))


@pytest.mark.parametrize("name", ["gru", "two-layer"])
def test_mean_over_keys_is_rtrl(name, getkey):
    model = _models(getkey())[name]
    xs, targets = jr.normal(getkey(), (LENGTH, 3)), jr.normal(getkey(), (LENGTH, 2))
    keys = KEYS[name]
    estimates, exact = _uoro_and_rtrl(model, xs, targets, jr.split(getkey(), keys))
    mean = estimates.mean(axis=0)
    standard_error = estimates.std(axis=0, ddof=1) / np.sqrt(keys)
    # Per coordinate, |mean − RTRL| ≤ z·SE, z for a two-sided test at FALSE_FAILURE / P. The
    # read-out's gradient is exact (SE = 0): round-off is allowed for there.
    z = norm.isf(FALSE_FAILURE / (2 * exact.size))
    round_off = 1e-10 * np.max(np.abs(exact))
    excess = np.abs(mean - exact) - (z * standard_error + round_off)
    assert np.all(excess <= 0), f"{np.sum(excess > 0)} coordinates off by more than z·SE"
    # The coordinates of the recurrent core, estimated through the trace (the read-out's
    # differ between keys by round-off only).
    noisy = standard_error > round_off
    assert noisy.sum() == ravel_pytree(eqx.filter(model.core, eqx.is_inexact_array))[0].size
    # Not vacuous: a bias of half a coordinate's value is resolved, on some coordinates.
    assert np.any(0.5 * np.abs(exact[noisy]) > z * standard_error[noisy])
    # The variance, reported (docs/algorithms/uoro.md): relative to RTRL's gradient, and as
    # the cosine of one key's estimate with it, over all the parameters and over the core's.
    print(f"\nUORO, {name}, T = {LENGTH}, {keys} keys (z = {z:.2f}):")
    for part, which in [("all parameters", slice(None)), ("recurrent core", noisy)]:
        g, g_star = estimates[:, which], exact[which]
        relative_variance = np.mean(np.sum((g - g_star) ** 2, axis=1)) / np.sum(g_star**2)
        cosines = g @ g_star / (np.linalg.norm(g, axis=1) * np.linalg.norm(g_star))
        print(
            f"  {part}: E|g - g*|^2 / |g*|^2 = {relative_variance:.3g}, cosine(g, g*) = "
            f"{np.mean(cosines):.3f} (median {np.median(cosines):.3f}), max |mean - g*| / SE "
            f"= {np.max(np.abs(mean - exact)[noisy] / standard_error[noisy]):.2f}"
        )


class Linear2(eqtrace.AbstractCell):
    """`h' = A h + B x`: `J^h = A`, and `νᵀ J^θ` is `(ν hᵀ, ν xᵀ)`."""

    a: jax.Array
    b: jax.Array

    def __init__(self, key):
        akey, bkey = jr.split(key)
        self.a = 0.5 * jr.normal(akey, (2, 2))
        self.b = jr.normal(bkey, (2, 3))

    def init_state(self):
        return jnp.zeros(2)

    def __call__(self, state, x):
        h = self.a @ state + self.b @ x
        return h, h


def test_recurrence_by_hand(getkey):
    cell = Linear2(getkey())
    algorithm = eqtrace.UORO(key=getkey())
    state = jr.normal(getkey(), (2,))
    trace = algorithm.init_trace(cell, state, jnp.zeros(3))
    a, b = np.asarray(cell.a), np.asarray(cell.b)
    h, h_tilde, theta_tilde, key = np.asarray(state), np.zeros(2), np.zeros(10), trace.key
    eps = np.finfo(np.float64).eps
    step = eqx.filter_jit(algorithm.step)  # one compilation rather than op by op
    for x in jr.normal(getkey(), (3, 3)):
        state, trace, _ = step(cell, state, trace, x)
        # The documented key schedule: split, draw the signs from the second key.
        key, signs_key = jr.split(key)
        nu = np.asarray(jr.rademacher(signs_key, (2,), jnp.int8), np.float64)
        propagated = a @ h_tilde
        nu_theta = np.concatenate([np.outer(nu, h).ravel(), np.outer(nu, x).ravel()])
        rho0 = np.sqrt((np.linalg.norm(theta_tilde) + eps) / (np.linalg.norm(propagated) + eps))
        rho1 = np.sqrt((np.linalg.norm(nu_theta) + eps) / (np.linalg.norm(nu) + eps))
        h_tilde = rho0 * propagated + rho1 * nu
        theta_tilde = theta_tilde / rho0 + nu_theta / rho1
        h = a @ h + b @ np.asarray(x)
        np.testing.assert_allclose(state, h, rtol=1e-12)
        np.testing.assert_allclose(trace.state_tilde, h_tilde, rtol=1e-12)
        np.testing.assert_allclose(trace.params_tilde, theta_tilde, rtol=1e-12)
        assert jnp.array_equal(jr.key_data(trace.key), jr.key_data(key))
    # The online gradient of a step is θ̃ (h̃ · ḡ), with the step's new trace.
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    online_step = eqtrace.make_online_step(algorithm, static)
    g = jr.normal(getkey(), (2,))

    def loss(p):
        _, new_trace, y = online_step(p, state, trace, x)
        return jnp.dot(y, g), new_trace

    grads, new_trace = jax.jit(jax.grad(loss, has_aux=True))(params)
    expected = new_trace.params_tilde * jnp.dot(new_trace.state_tilde, g)
    assert relative_error(ravel_pytree(grads)[0], expected) < 1e-12


def test_samples_of_a_batch_draw_independent_signs(getkey):
    """Identical samples, identical starts: only the keys differ. At the first step
    `h̃ = ρ₁ ν`, so the signs of `h̃` are the draws."""
    model = nn.GRUCell(3, 8, key=getkey())
    algorithm = eqtrace.UORO(key=getkey())
    batch = 256
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch)
    assert trace.key.shape == (batch,)
    assert len({tuple(k) for k in np.asarray(jr.key_data(trace.key))}) == batch

    @eqx.filter_jit
    def first_step(model, state, trace):
        return jax.vmap(lambda s, t: algorithm.step(model, s, t, jnp.ones(3)))(state, trace)

    _, trace, _ = first_step(model, state, trace)
    signs = np.sign(np.asarray(trace.state_tilde))  # (batch, 8)
    assert np.all(signs != 0)
    # Independent fair signs: every mean and every correlation between samples is
    # ±1/√8 ≈ ±0.35 in standard deviations; 5.5 of them is far out for so few terms.
    assert np.max(np.abs(signs.mean(axis=0))) < 5.5 / np.sqrt(batch)
    correlations = signs @ signs.T / 8
    off_diagonal = correlations[~np.eye(batch, dtype=bool)]
    assert abs(off_diagonal.mean()) < 5.5 / np.sqrt(8 * batch * (batch - 1) / 2)
    assert np.mean(off_diagonal == 1) < 0.02  # identical draws: 1/2⁸ on average


def test_keys_reseed_and_survive_transformations(getkey):
    model = nn.Sequential([nn.GRUCell(3, 4, key=getkey()), eqx.nn.Linear(4, 2, key=getkey())])
    algorithm = eqtrace.UORO(key=jr.key(1))
    _, trace = eqtrace.init_state_and_trace(model, algorithm)
    assert jnp.array_equal(jr.key_data(trace.key), jr.key_data(jr.key(1)))
    _, reseeded = eqtrace.init_state_and_trace(model, algorithm, key=jr.key(2))
    assert jnp.array_equal(jr.key_data(reseeded.key), jr.key_data(jr.key(2)))
    _, batched = eqtrace.init_state_and_trace(model, algorithm, 3, key=jr.key(2))
    assert jnp.array_equal(jr.key_data(batched.key), jr.key_data(jr.split(jr.key(2), 3)))
    # Other rules ignore the key.
    _, rtrl = eqtrace.init_state_and_trace(model, eqtrace.RTRL(), key=jr.key(2))
    assert not any(
        eqx.is_array(leaf) and leaf.dtype != jnp.float64 for leaf in jtu.tree_leaves(rtrl)
    )
    # Keys are not parameters: the algorithm's key is invisible to `eqx.is_inexact_array`.
    assert eqx.filter(algorithm, eqx.is_inexact_array).key is None


def test_trace_memory_is_state_plus_params(getkey):
    model = nn.Sequential([nn.GRUCell(3, 16, key=getkey()), eqx.nn.Linear(16, 2, key=getkey())])
    n_state = 16
    n_params = ravel_pytree(eqx.filter(model.layers[0], eqx.is_inexact_array))[0].size
    algorithm = eqtrace.UORO(key=getkey())
    values, nbytes = eqtrace.trace_size(algorithm, model)
    assert values == n_state + n_params
    assert nbytes == 8 * (n_state + n_params) + 8  # float64, and one key of two uint32
    assert eqtrace.trace_size(eqtrace.RTRL(), model).values == n_state * n_params
    report = eqtrace.check(model, algorithm)
    assert report.ok and f"{values:,} values" in str(report)


def test_bad_keys_are_explained(getkey):
    with pytest.raises(ValueError, match=r"UORO draws random numbers and needs a PRNG key"):
        eqtrace.UORO()
    with pytest.raises(TypeError, match=r"received an array of dtype uint32 and shape \[2\]"):
        eqtrace.UORO(key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"single PRNG key \(shape \(\)\).*shape \[3\]"):
        eqtrace.UORO(key=jr.split(jr.key(0), 3))
    model = nn.GRUCell(3, 4, key=getkey())
    with pytest.raises(ValueError, match="init_state_and_trace: `key` must be a single"):
        eqtrace.init_state_and_trace(model, eqtrace.UORO(key=jr.key(0)), 2, key=jr.split(getkey()))
    # A batch of traces given to an unbatched step: the key's shape is named.
    algorithm = eqtrace.UORO(key=jr.key(0))
    state, trace = eqtrace.init_state_and_trace(model, algorithm, 2)
    with pytest.raises(ValueError, match=r"(?s)`trace` does not fit.*key<fry>\[2\]"):
        algorithm.step(model, model.init_state(), trace, jnp.zeros(3))


class CondOnState(eqtrace.AbstractCell):
    """A leaky layer whose update passes through a `lax.cond` on its previous state: a
    derivative that transposes a JVP of the cell batched over a block's steps fails inside JAX
    (`Transpose rule for 'stop_gradient'`), as UORO's first block form did."""

    op: eqx.nn.Linear

    def __init__(self, in_size, *, key):
        self.op = eqx.nn.Linear(in_size, 4, key=key)

    def init_state(self):
        return jnp.zeros(4)

    def __call__(self, h, x):
        v = 0.5 * h + jnp.tanh(2 * self.op(x))
        # A predicate that flips often as the state moves: both branches are taken.
        v = jax.lax.cond(_flip(h), lambda v: v, lambda v: 0.5 * jnp.tanh(v), v)
        return v, v


def _flip(h):
    """Works on JAX and NumPy arrays alike."""
    return (h.sum(-1) * 7 % (2 * np.pi)) < np.pi


def _block_model(name, key):
    k = jr.split(key, 5)
    # A spiking layer whose reset is detached by `stop_gradient`, with a threshold its inputs
    # cross.
    lif = functools.partial(nn.LIF, recurrent=True, detach_reset=True, threshold=0.3)
    if name == "gru":
        return nn.Sequential([nn.GRUCell(3, 4, key=k[0]), eqx.nn.Linear(4, 2, key=k[1])])
    if name == "lif-detached":
        return nn.Sequential([lif(3, 4, key=k[0]), nn.LeakyReadout(4, 2, key=k[1])])
    if name == "cond":
        return nn.Sequential([CondOnState(3, key=k[0]), eqx.nn.Linear(4, 2, key=k[1])])
    # The three as one stack (one system for UORO), with input credit to a layer below.
    assert name == "stack"
    return nn.Sequential(
        [
            eqx.nn.Linear(3, 3, key=k[0]),
            nn.GRUCell(3, 4, key=k[1]),
            CondOnState(4, key=k[2]),
            lif(4, 4, key=k[3]),
            nn.LeakyReadout(4, 2, key=k[4]),
        ]
    )


def _layer_outputs(model, state, xs):
    """Each layer's output over the steps of a batch (`xs` time-major)."""

    def step(states, x):
        new_states, outputs = [], []
        for layer, layer_state in zip(model.layers, states):
            if isinstance(layer, eqtrace.AbstractCell):
                layer_state, x = jax.vmap(layer)(layer_state, x)
            else:
                x = jax.vmap(layer)(x)
            new_states.append(layer_state)
            outputs.append(x)
        return tuple(new_states), outputs

    return jax.lax.scan(step, state, xs)[1]


@pytest.mark.parametrize("name", ["gru", "lif-detached", "cond", "stack"] if LONG else ["stack"])
def test_blocks_equal_steps_under_jit_and_vmap(name, getkey):
    """A batch of 2 (`vmap`) in jitted blocks of 1, 3 (a remainder of 2) and more steps than the
    sequence, against stepping: loss, online gradient, state and trace (with its keys). By
    default on the stack of a GRU, a `lax.cond` on the state and a detached spike reset; each
    alone under `EQTRACE_HYPOTHESIS_PROFILE=long`."""
    model = _block_model(name, getkey())
    batch, block_sizes = 2, (1, 3, 2 * LENGTH)
    xs = 2 * jr.normal(getkey(), (LENGTH, batch, 3))
    targets = jr.normal(getkey(), (LENGTH, batch, 2))
    algorithm = eqtrace.UORO(key=getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch, x=xs[0, 0])
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    block = jax.vmap(
        eqtrace.make_online_block(algorithm, static), in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1)
    )

    @eqx.filter_jit  # one compilation for all
    def stepped_and_blocked(params, state, trace):
        def run(block_size):
            return eqtrace.online_gradient(
                step if block_size is None else block,
                squared_loss,
                params,
                state,
                trace,
                xs,
                targets,
                block_size=block_size,
                reduction="sum",
            )

        return run(None), [run(size) for size in block_sizes]

    stepped, blocked = stepped_and_blocked(params, state, trace)
    for size, result in zip(block_sizes, blocked):
        assert relative_error(result, stepped) <= 1e-10, f"blocks of {size}"
    # Not vacuous: every parameter gets a gradient, the spiking layer spikes at some steps,
    # and the cond takes both branches.
    assert all(np.any(np.asarray(g) != 0) for g in jtu.tree_leaves(stepped[1]))
    outputs = _layer_outputs(model, state, xs)
    for layer, output in zip(model.layers, outputs):
        if isinstance(layer, nn.LIF):
            assert 0 < np.mean(output) < 1
        if isinstance(layer, CondOnState):  # the predicate is on the previous state
            assert 0 < np.mean(_flip(np.asarray(output[:-1]))) < 1


def _arrays_in(jaxpr):
    """The shapes of every value in `jaxpr` and the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars)
        for param in eqn.params.values():
            for inner in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from _arrays_in(inner)


def test_a_block_keeps_no_steps_params_tilde(getkey):
    """The gradient of a block of `C` steps holds no value of `C |θ|` numbers or more (the
    scanned steps kept every step's `θ̃_t`, a `(C, B, |θ|)` array): its derivative recomputes
    each step's `ν_tᵀ J^θ_t` where it is transposed."""
    model = _block_model("gru", getkey())
    algorithm = eqtrace.UORO(key=getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    n_params = ravel_pytree(eqx.filter(model.core, eqx.is_inexact_array))[0].size
    blocks, batch = 6, 2
    xs = jnp.zeros((batch, blocks, 3))
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch, x=xs[0, 0])

    def largest(rule):
        block = jax.vmap(eqtrace.make_online_block(rule, static), in_axes=(None, 0, 0, 0))
        loss = lambda params: jnp.sum(block(params, state, trace, xs)[2] ** 2)  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
        return max(int(np.prod(shape)) for shape in _arrays_in(jaxpr))

    assert largest(algorithm) < blocks * n_params

    class Scanned(eqtrace.UORO):  # the default block: UORO's steps, scanned
        cell_steps = eqtrace.AbstractAlgorithm.cell_steps

    assert largest(Scanned(key=algorithm.key)) >= blocks * batch * n_params
