"""OTPE against its oracles: the update of the authors' code for the paper (Summe et al. 2023,
`OTPE.py` of Intelligent-Microsystems-Lab/OTPE) written naively, a loop over time with its
equations, on two feed-forward LIF layers with a loss on the top layer's spikes; the leak
read from the code equals the leak given; its refusals. The oracles that hold for every rule
(RTRL at the first step, blocks = steps, batch = loop, jit = no jit) run for it through
`registry.SPECIALISED` in test_ottt.py."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

import eqtrace
from eqtrace import nn
from helpers import online_and_bptt, relative_error, squared_loss


INPUT, HIDDEN, OUTPUT, LENGTH, TAU = 3, 5, 2, 8, 5.0
LEAK = math.exp(-1.0 / TAU)


def _naive_otpe(model, xs, targets, lam):
    """The authors' OTPE on `LIF → LIF`, loss on the top layer's spikes at each step. Per
    layer: D-RTRL's trace of the membrane `E_t = (α − ϑ s'(v_{t-1})) E_{t-1} + x_t` (the
    reset differentiated), `R̂_t = λ R̂_{t-1} + s'(v_t) E_t`, `r_t = λ r_{t-1} + 1`,
    `ḡ_t = (λ r_{t-1}/r_t) ḡ_{t-1} + (1 − λ r_{t-1}/r_t) s'(v_t)`; the gradient `δ_t ⊙ R̂_t`,
    and `δ` of the layer below `W_2ᵀ (δ_t ⊙ ḡ_t)`."""
    lif1, lif2 = model.layers
    w1, w2 = lif1.input_op.weight, lif2.input_op.weight

    def spike(cell, v):
        return cell.surrogate((v - cell.threshold) / cell.threshold)

    def slope(cell, v):
        return jax.vmap(jax.grad(lambda v: spike(cell, v)))(v)

    def layer(cell, carry, x):
        v, e, r_hat, r, g_bar = carry
        alpha = math.exp(-cell.dt / cell.tau_mem)
        leak = alpha - cell.threshold * slope(cell, v)  # the reset differentiated
        v = alpha * v - cell.threshold * spike(cell, v) + cell.input_op.weight @ x
        e = leak[:, None] * e + x[None, :]
        d = slope(cell, v)
        r_hat = lam * r_hat + d[:, None] * e
        ratio = lam * r / (lam * r + 1)
        r = lam * r + 1
        g_bar = ratio * g_bar + (1 - ratio) * d
        return (v, e, r_hat, r, g_bar), spike(cell, v)

    def step(carry, inputs):
        c1, c2, grads = carry
        x, target = inputs
        c1, s1 = layer(lif1, c1, x)
        c2, s2 = layer(lif2, c2, s1)
        delta2 = jax.grad(squared_loss)(s2, target)
        delta1 = w2.T @ (delta2 * c2[4])
        updates = {"w1": delta1[:, None] * c1[2], "w2": delta2[:, None] * c2[2]}
        return (c1, c2, jtu.tree_map(jnp.add, grads, updates)), None

    def zeros(n_in, n_out):
        return (jnp.zeros(n_out), jnp.zeros((n_out, n_in)), jnp.zeros((n_out, n_in)), 0.0,
                jnp.zeros(n_out))  # fmt: skip

    grads = {"w1": jnp.zeros_like(w1), "w2": jnp.zeros_like(w2)}
    init = (zeros(INPUT, HIDDEN), zeros(HIDDEN, OUTPUT), grads)
    (*_, grads), _ = jax.lax.scan(step, init, (xs, targets))
    return grads


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


@pytest.mark.parametrize("name", list(REFUSED))
def test_refusals(name, getkey):
    options, make, message = REFUSED[name]
    cell = make(getkey())
    with pytest.raises(eqtrace.StructureError, match=message):
        eqtrace.OTPE(**options).init_trace(cell, cell.init_state(), jnp.zeros(INPUT))


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
