"""OTPE and approximate OTPE against their oracles: the updates of the authors' code for the
paper (Summe et al. 2023, classes `OTPE` and `Approx_OTPE` of `OTPE.py` in
Intelligent-Microsystems-Lab/OTPE) written naively, a loop over time with their equations, on
two feed-forward LIF layers with a loss on the top layer's spikes; where the two coincide (the
first step; a linear leaky integrator of leak λ); the leak read from the code equals the leak
given; the refusals. The oracles that hold for every rule (RTRL at the first step, blocks =
steps, batch = loop, jit = no jit) run for both through `registry.SPECIALISED` in
test_ottt.py."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

import eqtrace
from eqtrace import nn
from helpers import online_and_bptt, online_only, relative_error, squared_loss


INPUT, HIDDEN, OUTPUT, LENGTH, TAU = 3, 5, 2, 8, 5.0
LEAK = math.exp(-1.0 / TAU)


def _spike(cell, v):
    return cell.surrogate((v - cell.threshold) / cell.threshold)


def _slope(cell, v):
    return jax.vmap(jax.grad(lambda v: _spike(cell, v)))(v)


def _two_layers(model, xs, targets, layer, zeros, updates):
    """The loop both naive oracles share, on `LIF → LIF` with the loss on the top layer's
    spikes at each step: `layer(cell, carry, x) -> (carry, spikes)` per layer (`carry[4]` is
    `ḡ`), `δ` of the layer below `W_2ᵀ (δ_t ⊙ ḡ_t)`, and `updates(δ_1, δ_2, c_1, c_2)` the
    step's gradient terms of `w1` and `w2`."""
    lif1, lif2 = model.layers
    w1, w2 = lif1.input_op.weight, lif2.input_op.weight

    def step(carry, inputs):
        c1, c2, grads = carry
        x, target = inputs
        c1, s1 = layer(lif1, c1, x)
        c2, s2 = layer(lif2, c2, s1)
        delta2 = jax.grad(squared_loss)(s2, target)
        delta1 = w2.T @ (delta2 * c2[4])
        return (c1, c2, jtu.tree_map(jnp.add, grads, updates(delta1, delta2, c1, c2))), None

    grads = {"w1": jnp.zeros_like(w1), "w2": jnp.zeros_like(w2)}
    init = (zeros(INPUT, HIDDEN), zeros(HIDDEN, OUTPUT), grads)
    (*_, grads), _ = jax.lax.scan(step, init, (xs, targets))
    return grads


def _naive_otpe(model, xs, targets, lam):
    """The authors' OTPE on `LIF → LIF`, loss on the top layer's spikes at each step. Per
    layer: D-RTRL's trace of the membrane `E_t = (α − ϑ s'(v_{t-1})) E_{t-1} + x_t` (the
    reset differentiated), `R̂_t = λ R̂_{t-1} + s'(v_t) E_t`, `r_t = λ r_{t-1} + 1`,
    `ḡ_t = (λ r_{t-1}/r_t) ḡ_{t-1} + (1 − λ r_{t-1}/r_t) s'(v_t)`; the gradient `δ_t ⊙ R̂_t`,
    and `δ` of the layer below `W_2ᵀ (δ_t ⊙ ḡ_t)`."""

    def layer(cell, carry, x):
        v, e, r_hat, r, g_bar = carry
        alpha = math.exp(-cell.dt / cell.tau_mem)
        leak = alpha - cell.threshold * _slope(cell, v)  # the reset differentiated
        v = alpha * v - cell.threshold * _spike(cell, v) + cell.input_op.weight @ x
        e = leak[:, None] * e + x[None, :]
        d = _slope(cell, v)
        r_hat = lam * r_hat + d[:, None] * e
        ratio = lam * r / (lam * r + 1)
        r = lam * r + 1
        g_bar = ratio * g_bar + (1 - ratio) * d
        return (v, e, r_hat, r, g_bar), _spike(cell, v)

    def zeros(n_in, n_out):
        return (jnp.zeros(n_out), jnp.zeros((n_out, n_in)), jnp.zeros((n_out, n_in)), 0.0,
                jnp.zeros(n_out))  # fmt: skip

    def updates(delta1, delta2, c1, c2):
        return {"w1": delta1[:, None] * c1[2], "w2": delta2[:, None] * c2[2]}

    return _two_layers(model, xs, targets, layer, zeros, updates)


def _model(key, **options):
    k1, k2 = jr.split(key)
    return nn.Sequential(
        [
            nn.LIF(INPUT, HIDDEN, tau_mem=TAU, key=k1, **options),
            nn.LIF(HIDDEN, OUTPUT, tau_mem=TAU, key=k2, **options),
        ]
    )


def _data(key):
    kx, kt = jr.split(key)
    return 2.0 * jr.normal(kx, (LENGTH, INPUT)), jr.normal(kt, (LENGTH, OUTPUT))


def test_equals_the_authors_update_written_naively(getkey):
    model = _model(getkey())
    xs, targets = _data(getkey())
    online, _ = online_and_bptt(eqtrace.OTPE(leak=LEAK), model, xs, targets)
    naive = _naive_otpe(model, xs, targets, LEAK)
    got = {"w1": online.layers[0].input_op.weight, "w2": online.layers[1].input_op.weight}
    assert relative_error(got, naive) <= 1e-12
    # Not vacuous: both layers spike and learn, and OTPE is neither D-RTRL nor e-prop.
    _, spikes = jax.lax.scan(lambda s, x: model.layers[0](s, x), model.layers[0].init_state(), xs)
    assert 0 < float(jnp.mean(spikes)) < 1
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in naive.values())
    drtrl, _ = online_and_bptt(eqtrace.DRTRL(), model, xs, targets)
    assert relative_error(online.layers[1], drtrl.layers[1]) > 1e-3


def test_the_leak_read_from_the_code_is_the_leak_given(getkey):
    model = _model(getkey(), detach_reset=True)
    xs, targets = _data(getkey())
    read, _ = online_and_bptt(eqtrace.OTPE(), model, xs, targets)
    given, _ = online_and_bptt(eqtrace.OTPE(leak=LEAK), model, xs, targets)
    assert relative_error(read, given) <= 1e-12
    other, _ = online_and_bptt(eqtrace.OTPE(leak=0.5), model, xs, targets)
    assert relative_error(other, given) > 1e-3


def test_first_step_sends_the_exact_credit_down(getkey):
    """At the first step `R̂ = ds/dθ` and `ḡ = ∂s/∂u`: OTPE is RTRL on both layers."""
    model = _model(getkey())
    xs, targets = _data(getkey())
    online, _ = online_and_bptt(eqtrace.OTPE(leak=LEAK), model, xs[:1], targets[:1])
    exact, _ = online_and_bptt(eqtrace.RTRL(), model, xs[:1], targets[:1])
    assert relative_error(online, exact) <= 1e-12
    assert float(jnp.max(jnp.abs(online.layers[0].input_op.weight))) > 0


def _naive_approximate_otpe(model, xs, targets, lam):
    """The authors' approximate OTPE (`Approx_OTPE`) on `LIF → LIF`, loss on the top layer's
    spikes at each step. Per layer, no weight-shaped trace: the input filtered twice,
    `â_t = λ â_{t-1} + x_t` and `ẑ_t = λ ẑ_{t-1} + â_t`, and OTPE's `r_t` and `ḡ_t`; the
    gradient `(δ_t ⊙ ḡ_t) ⊗ ẑ_t`, and `δ` of the layer below `W_2ᵀ (δ_t ⊙ ḡ_t)`."""

    def layer(cell, carry, x):
        v, a_hat, z_hat, r, g_bar = carry
        alpha = math.exp(-cell.dt / cell.tau_mem)
        v = alpha * v - cell.threshold * _spike(cell, v) + cell.input_op.weight @ x
        a_hat = lam * a_hat + x
        z_hat = lam * z_hat + a_hat
        ratio = lam * r / (lam * r + 1)
        r = lam * r + 1
        g_bar = ratio * g_bar + (1 - ratio) * _slope(cell, v)
        return (v, a_hat, z_hat, r, g_bar), _spike(cell, v)

    def zeros(n_in, n_out):
        return (jnp.zeros(n_out), jnp.zeros(n_in), jnp.zeros(n_in), 0.0, jnp.zeros(n_out))

    def updates(delta1, delta2, c1, c2):
        return {
            "w1": jnp.outer(delta1 * c1[4], c1[2]),
            "w2": jnp.outer(delta2 * c2[4], c2[2]),
        }

    return _two_layers(model, xs, targets, layer, zeros, updates)


def test_approximate_equals_the_authors_update_written_naively(getkey):
    model = _model(getkey())
    xs, targets = _data(getkey())
    approximate = eqtrace.OTPE(leak=LEAK, approximate=True)
    online = online_only(approximate, model, xs, targets)
    naive = _naive_approximate_otpe(model, xs, targets, LEAK)
    got = {"w1": online.layers[0].input_op.weight, "w2": online.layers[1].input_op.weight}
    assert relative_error(got, naive) <= 1e-12
    # Not vacuous: both layers learn, and it is not OTPE beyond the first step.
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in naive.values())
    otpe = online_only(eqtrace.OTPE(leak=LEAK), model, xs, targets)
    assert relative_error(online, otpe) > 1e-3
    # Its trace: two values per input and one per neuron and the normaliser, per layer.
    size = eqtrace.trace_size(approximate, model, xs[0]).values
    assert size == (2 * INPUT + HIDDEN + 1) + (2 * HIDDEN + OUTPUT + 1)


def test_approximate_first_step_is_otpe_and_rtrl(getkey):
    """At the first step `ẑ = x` and `ḡ = ∂s/∂u`: approximate OTPE is OTPE and RTRL."""
    model = _model(getkey())
    xs, targets = _data(getkey())
    rules = (eqtrace.OTPE(leak=LEAK, approximate=True), eqtrace.OTPE(leak=LEAK), eqtrace.RTRL())
    approximate, otpe, exact = (online_only(r, model, xs[:1], targets[:1]) for r in rules)
    assert relative_error(approximate, otpe) <= 1e-12
    assert relative_error(approximate, exact) <= 1e-12
    assert float(jnp.max(jnp.abs(approximate.layers[0].input_op.weight))) > 0


class _LeakyLinear(eqtrace.AbstractCell):
    """`v_t = λ v_{t-1} + W x_t + b`, output `v_t / 2`: a linear leaky integrator of the
    rules' leak, whose output's derivative in the op's output is the constant 1/2."""

    op: nn.Linear

    def __init__(self, input_size, hidden_size, *, key):
        self.op = nn.Linear(input_size, hidden_size, key=key)

    def init_state(self):
        return (jnp.zeros(self.op.weight.shape[0]),)

    def __call__(self, state, x):
        new_state = (LEAK * state[0] + self.op(x),)
        return new_state, self.output(new_state)

    def output(self, state):
        return state[0] / 2


def test_approximate_is_otpe_on_a_linear_leaky_integrator(getkey):
    """With a constant surrogate derivative `c` and the membrane a leaky integrator of leak
    `λ`, OTPE's `R̂_t = c Σ_τ λ^{t-τ} Σ_k λ^{τ-k} x_k = c ẑ_t` and `ḡ_t = c`: the two are
    one rule, biases included (the constant input 1 filtered twice)."""
    model = nn.Sequential(
        [_LeakyLinear(INPUT, HIDDEN, key=getkey()), _LeakyLinear(HIDDEN, OUTPUT, key=getkey())]
    )
    xs, targets = _data(getkey())
    approximate = online_only(eqtrace.OTPE(leak=LEAK, approximate=True), model, xs, targets)
    otpe = online_only(eqtrace.OTPE(leak=LEAK), model, xs, targets)
    assert relative_error(approximate, otpe) <= 1e-12
    assert all(bool(jnp.all(g != 0)) for g in jtu.tree_leaves(approximate))


def _state_loss_gradient(algorithm, cell, xs):
    """The summed online gradients of `Σ_t |h_t|²`, a loss on the state itself."""
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    step = eqtrace.make_online_step(algorithm, static)

    def loss(params, state, trace, x):
        new_state, new_trace, _ = step(params, state, trace, x)
        return jnp.sum(new_state[0] ** 2), (new_state, new_trace)

    def body(carry, x):
        state, trace = carry
        grads, carry = jax.grad(loss, has_aux=True)(params, state, trace, x)
        return carry, grads

    state = cell.init_state()
    trace = algorithm.init_trace(cell, state, xs[0])
    _, grads = jax.lax.scan(body, (state, trace), xs)
    return jtu.tree_map(lambda g: jnp.sum(g, axis=0), grads)


def test_approximate_state_derivative_is_drtrl_with_the_reset_detached(getkey):
    """The state's own derivative is `∂h_t/∂u_t · (δW â_t)`: D-RTRL's, exactly, on a LIF
    whose leak is `λ` and whose reset is detached (OTTT's cell)."""
    cell = nn.LIF(INPUT, HIDDEN, tau_mem=TAU, detach_reset=True, key=getkey())
    xs, _ = _data(getkey())
    approximate = _state_loss_gradient(eqtrace.OTPE(leak=LEAK, approximate=True), cell, xs)
    drtrl = _state_loss_gradient(eqtrace.DRTRL(), cell, xs)
    assert relative_error(approximate, drtrl) <= 1e-12
    assert float(jnp.max(jnp.abs(approximate.input_op.weight))) > 0


REFUSED = {
    "recurrent": (
        dict(leak=LEAK),
        lambda key: nn.LIF(INPUT, HIDDEN, recurrent=True, key=key),
        "OTPE cannot trace the op `.recurrent_op`",
    ),
    "reset differentiated, no leak": (
        {},
        lambda key: nn.LIF(INPUT, HIDDEN, key=key),
        "OTPE cannot read the membrane leak",
    ),
    "synapse, no leak": (
        {},
        lambda key: nn.LIF(INPUT, HIDDEN, synapse=True, detach_reset=True, key=key),
        "2 state leaves",
    ),
}


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("name", list(REFUSED))
def test_refusals(name, approximate, getkey):
    options, make, message = REFUSED[name]
    cell = make(getkey())
    with pytest.raises(eqtrace.StructureError, match=message):
        rule = eqtrace.OTPE(**options, approximate=approximate)
        rule.init_trace(cell, cell.init_state(), jnp.zeros(INPUT))


def test_approximate_refuses_parameters_outside_the_ops(getkey):
    cell = nn.LIF(INPUT, HIDDEN, learn_tau=True, key=getkey())
    state, x = cell.init_state(), jnp.zeros(INPUT)
    with pytest.raises(eqtrace.StructureError, match=r"approximate=True\) cannot trace .*log_tau"):
        eqtrace.OTPE(leak=LEAK, approximate=True).init_trace(cell, state, x)
    eqtrace.OTPE(leak=LEAK).init_trace(cell, state, x)  # OTPE traces them


@pytest.mark.parametrize("leak", [0.0, 1.0, -0.5])
def test_leak_out_of_range(leak):
    with pytest.raises(ValueError, match=r"`leak` must be the membrane leak .* in \(0, 1\)"):
        eqtrace.OTPE(leak=leak)


def test_every_rule_of_the_network_is_otpe(getkey):
    """In a `Sequential`, each spiking layer runs OTPE; a stateless read-out above it
    gets its exact gradient."""
    model = nn.Sequential([*_model(getkey()).layers, eqx.nn.Linear(OUTPUT, 2, key=getkey())])
    plan = eqtrace.prepare(eqtrace.OTPE(leak=LEAK), model, jnp.zeros(INPUT))
    rules = [type(layer.rule).__name__ for layer in plan.layers if layer.rule is not None]
    assert rules == ["OTPE", "OTPE"]
