"""Generated oracle tests: random cells and networks from a small grammar (`grammar.py`) against
the oracles of docs/architecture.md §3, always through the step-by-step trace path
(`make_online_step`/`make_online_block` + `online_gradient`), in float64.

Compilation dominates: each example is a new model, so every function compiles afresh (about
5-10 s per example on 2 CPU cores, a third of it the eager step of the jit oracle). Each test
therefore checks several oracles on the models it draws, reusing the compiled functions, and
the default profile runs few examples besides the explicit ones (one each): deterministic,
without shrinking, about a minute for the file. `EQTRACE_HYPOTHESIS_PROFILE=long` selects
a randomised, shrinking profile with 400 examples per test (hours; `EQTRACE_LONG_EXAMPLES=n`
sets another count).
"""

import dataclasses
import functools
import itertools
import math
import os
from typing import Any, NamedTuple

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, example, given, note, settings
from jax.flatten_util import ravel_pytree
from scipy.stats import norm

import eqtrace
from eqtrace import nn
from grammar import (
    CellSpec,
    LayerSpec,
    LeafSpec,
    NetworkSpec,
    OpSpec,
    Source,
    build_network,
    network_specs,
)
from helpers import key_data


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
# Without shrinking by default: each example compiles afresh, so shrinking a failure takes
# minutes. The long profile shrinks (and is randomised); neither runs the costly explain phase.
settings.register_profile(
    "eqtrace-generated",
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=_HEALTH,
)
settings.register_profile(
    "eqtrace-generated-long",
    # `EQTRACE_LONG_EXAMPLES` sets another count for a run that must finish in a given time.
    max_examples=int(os.environ.get("EQTRACE_LONG_EXAMPLES", "400")),
    deadline=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=_HEALTH,
)
_LONG = os.environ.get("EQTRACE_HYPOTHESIS_PROFILE") == "long"
_PROFILE = settings.get_profile("eqtrace-generated-long" if _LONG else "eqtrace-generated")


def examples(n: int) -> settings:
    """The profile's settings, running `n` examples by default (the long profile's count when
    it is selected)."""
    return settings(_PROFILE, max_examples=_PROFILE.max_examples if _LONG else n)


_examples_run = itertools.count(1)


def releasing_compiled_code(test):
    """Clears JAX's caches after every 25 examples. Every example compiles new programs;
    keeping them all exhausts the process's memory mappings after a hundred or so examples
    ("LLVM compilation error: Cannot allocate memory"), while clearing after each one would
    recompile the primitives that eager code shares between examples."""

    @functools.wraps(test)
    def run_example(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        finally:
            if next(_examples_run) % 25 == 0:
                jax.clear_caches()

    return run_example


@dataclasses.dataclass(frozen=True)
class Case:
    """A drawn network, the seed of its parameters and data, and a sequence length."""

    spec: NetworkSpec
    seed: int
    length: int


cases = st.builds(Case, network_specs(), st.integers(0, 2**16), st.integers(3, 4))
ppprop_rules = st.one_of(
    st.builds(lambda r: eqtrace.PPProp(rank=r), st.integers(1, 8)),
    st.builds(eqtrace.PPProp, st.floats(0.0, 0.95)),
    st.builds(
        lambda a, b: eqtrace.PPProp(input_decay=a, output_decay=b),
        st.floats(0.0, 0.95),
        st.floats(0.0, 0.95),
    ),
)
snapn_rules = st.builds(eqtrace.SnAp, st.integers(2, 3))
#: The rules a generated network is also run with, one per example (D-RTRL and SnAp-1 run on
#: every example): a pp-prop or a SnAp-n.
drawn_rules = st.one_of(ppprop_rules, snapn_rules)
diagonal_rules = st.one_of(
    st.builds(eqtrace.DRTRL), st.builds(eqtrace.SnAp1), st.builds(eqtrace.EProp), drawn_rules
)
uoro_rules = st.builds(lambda seed: eqtrace.UORO(key=jr.key(seed)), st.integers(0, 2**16))
#: UORO's oracle: over this many keys, its mean online gradient is RTRL's within z·SE, z for a
#: false failure once in a million runs (Bonferroni over the coordinates).
UORO_KEYS, UORO_FALSE_FAILURE = 1000, 1e-6


class Problem(NamedTuple):
    model: Any
    params: Any
    static: Any
    state: Any  # a random state (the initial state perturbed)
    xs: Any
    targets: Any


def materialise(case: Case, batch: int | None = None) -> Problem:
    """The model of `case`, a random state, inputs and targets (with a batch axis after the
    time axis, and a batch of states, if `batch` is given).

    The model's structure comes from the layers' constructors, run abstractly; its arrays are
    drawn afresh with NumPy (weights uniform in ±1/√fan-in, other parameters in ±1, masks
    Bernoulli(0.7)). Generic values suit the oracles, and NumPy compiles nothing: each random
    JAX array of a new shape would compile on its own.
    """
    rng = np.random.default_rng(case.seed)

    def draw(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if leaf.dtype == jnp.bool_:
            return jnp.asarray(rng.random(leaf.shape) < 0.7)
        scale = 1 / np.sqrt(leaf.shape[-1]) if len(leaf.shape) >= 2 else 1.0
        return jnp.asarray(rng.uniform(-scale, scale, leaf.shape), leaf.dtype)

    model = jtu.tree_map(draw, eqx.filter_eval_shape(build_network, case.spec, jr.key(0)))
    init = model.init_state()
    batch_shape = () if batch is None else (batch,)
    state = jtu.tree_map(
        lambda a: jnp.asarray(np.asarray(a) + 0.5 * rng.normal(size=(*batch_shape, *a.shape))),
        init,
    )
    lead = (case.length, *batch_shape)
    first = case.spec.layers[0]
    if case.spec.tokens:
        xs = jnp.asarray(rng.integers(0, first.in_size, lead))
    else:
        xs = jnp.asarray(1.5 * rng.normal(size=(*lead, first.in_size)))
    if batch is None:
        model = centre_bands(model, state, xs[0])
    note(f"model: {model}")
    params, static = eqx.partition(model, eqx.is_inexact_array)
    _, y = jax.eval_shape(model, init, xs[(0,) * len(lead)])
    targets = jnp.asarray(rng.normal(size=(*lead, *y.shape)), y.dtype)
    return Problem(model, params, static, state, xs, targets)


def centre_bands(model, state, x):
    """`model` with the band of every generated cell whose `BandSpec.inside` is set placed on
    its drive at the first step from `state` on `x`, so that the example starts inside it: a
    quarter width above the band's centre, inside every band yet off the discontinuities of
    the gates' values (a box surrogate steps at the centre, `threshold` at a quarter width
    below it). Exactly on a step, round-off alone (one code path's last bit against
    another's) decides the value, and the oracles compare different code paths."""

    def centred(cell, cell_state, cell_input):
        band = getattr(getattr(cell, "spec", None), "band", None)
        if band is None or not band.inside:
            return cell
        centre = cell.band_drive(cell_state, cell_input) - band.width / 4
        return eqx.tree_at(lambda c: c.band_centre, cell, centre)

    if not isinstance(model, nn.Sequential):
        return centred(model, state, x)
    layers = []
    for layer, layer_state in zip(model.layers, state):
        if isinstance(layer, eqtrace.AbstractCell):
            layer = centred(layer, layer_state, x)
            _, x = layer(layer_state, x)
        else:
            x = layer(x)
        layers.append(layer)
    return nn.Sequential(layers)


def weighted_loss(y, target):
    """`w · |y − y*|²` for `target = (y*, w)`: weights `(1, 0, …, 0)` keep the first step only,
    so one compiled `online_gradient` serves both the first-step and the whole-sequence
    oracles."""
    value, weight = target
    return weight * jnp.sum((y - value) ** 2)


def batch_loss(y, target):
    """The mean over the batch (leading axis of `y` and of `target[0]`) of `weighted_loss`."""
    values, weight = target
    return jnp.mean(jax.vmap(lambda y, v: weighted_loss(y, (v, weight)))(y, values))


def weights(length: int, *, first_only: bool = False) -> jax.Array:
    """Per-step loss weights: all ones, or `(1, 0, …, 0)`."""
    return jnp.asarray(np.eye(1, length)[0] if first_only else np.ones(length))


def online(step, p: Problem, trace, w, block_size=None):
    """`(loss, grads, state, trace)` of `online_gradient` on the problem with step weights `w`."""
    return eqtrace.online_gradient(
        step,
        weighted_loss,
        p.params,
        p.state,
        trace,
        p.xs,
        (p.targets, w),
        block_size=block_size,
        reduction="sum",
    )


def init_or_refusal(algorithm, model, state, x):
    """The initial trace, or the `ValueError` with which the algorithm refuses the model. Any
    other exception is a crash and propagates."""
    try:
        return algorithm.init_trace(model, state, x), None
    except ValueError as error:
        return None, error


def assert_close(actual, expected, rtol: float, what: str) -> None:
    """Leaf-wise `max|a − e| <= rtol · max|e|`, with `max|e|` floored at 1e-6 of the largest
    leaf of `expected` (round-off on a leaf that is exactly zero is not an error). PRNG keys
    compare by their data."""
    assert jtu.tree_structure(actual) == jtu.tree_structure(expected), what
    actual, expected = key_data(actual), key_data(expected)
    paths_and_expected = jtu.tree_leaves_with_path(expected)
    scale = max((float(np.max(np.abs(e), initial=0)) for _, e in paths_and_expected), default=0)
    errors = []
    for (path, e), a in zip(paths_and_expected, jtu.tree_leaves(actual)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{what}: {jtu.keystr(path)} shapes {a.shape} != {e.shape}"
        floor = max(float(np.max(np.abs(e), initial=0)), 1e-6 * scale, 1e-300)
        error = float(np.max(np.abs(a - e), initial=0)) / floor
        if not error <= rtol:
            errors.append(f"{jtu.keystr(path)} (relative error {error:.1e})")
    assert not errors, f"{what}: leaves differ: {', '.join(errors)}"


def assert_gradient_everywhere(grads, bptt, what: str) -> None:
    """Every parameter gets a finite gradient, not identically zero where BPTT's is not."""
    scale = max(float(np.max(np.abs(b), initial=0)) for b in jtu.tree_leaves(bptt))
    missing = [
        jtu.keystr(path)
        for (path, g), b in zip(jtu.tree_leaves_with_path(grads), jtu.tree_leaves(bptt))
        if not np.all(np.isfinite(g))
        or (np.max(np.abs(b), initial=0) > 1e-9 * scale and not np.any(np.asarray(g) != 0))
    ]
    assert not missing, f"{what}: no finite, non-zero gradient for {missing}"


def assert_unbiased(p: Problem, algorithm, seed: int, w, exact) -> None:
    """The mean of `algorithm`'s online gradient over `UORO_KEYS` keys (one compilation, keys
    vmapped) equals RTRL's `exact` within `z·SE` on every coordinate."""

    def estimate(key):
        # (The state is the problem's random one; the trace depends only on its shape.)
        _, trace = eqtrace.init_state_and_trace(p.model, algorithm, x=p.xs[0], key=key)
        step = eqtrace.make_online_step(algorithm, p.static)
        return ravel_pytree(online(step, p, trace, w)[1])[0]

    estimates = np.asarray(jax.vmap(estimate)(jr.split(jr.key(seed), UORO_KEYS)))
    exact = np.asarray(ravel_pytree(exact)[0])
    assert np.all(np.isfinite(estimates)), f"{algorithm}: non-finite estimates"
    standard_error = estimates.std(axis=0, ddof=1) / np.sqrt(UORO_KEYS)
    z = float(norm.isf(UORO_FALSE_FAILURE / (2 * exact.size)))
    round_off = 1e-9 * max(float(np.max(np.abs(exact), initial=0)), 1e-300)
    excess = np.abs(estimates.mean(axis=0) - exact) - (z * standard_error + round_off)
    assert np.all(excess <= 0), (
        f"{algorithm}: the mean over {UORO_KEYS} keys differs from RTRL by more than "
        f"z·SE (z = {z:.2f}) on {int(np.sum(excess > 0))} of {exact.size} coordinates"
    )


def offender_names(model) -> set[str]:
    """What a refusal may name: the attribute paths of every cell's parameters and of the
    modules holding them (`.op1`, `.op1.weight`, `.shared`), and a state leaf (`` `state``)."""
    layers = model.layers if isinstance(model, eqtrace.nn.Sequential) else (model,)
    names = {"`state"}
    for cell in layers:
        if isinstance(cell, eqtrace.AbstractCell):
            for path, _ in jtu.tree_leaves_with_path(eqx.filter(cell, eqx.is_inexact_array)):
                names.update(jtu.keystr(path[:i]) for i in range(1, len(path) + 1))
    return names


def structure_report(model, algorithm, x) -> eqtrace.StructureReport:
    """`eqtrace.check`'s report, which must describe violations rather than raise them."""
    try:
        return eqtrace.check(model, algorithm, x=x)
    except ValueError as error:
        pytest.fail(f"eqtrace.check raised instead of reporting: {error}")


def assert_deliberate_refusal(algorithm, model, refusal: ValueError, report) -> None:
    message = str(refusal)
    assert not report.ok and report.refusal == message, (
        f"{algorithm} refused a model, but `eqtrace.check` does not report that refusal:\n"
        f"{message}\n{report}"
    )
    assert any(name in message for name in offender_names(model)), (
        f"{algorithm}'s refusal names no op, parameter or state leaf of the model: {message}"
    )


def _generated(cell: CellSpec, *, before: str | None = None, after: str | None = None) -> Case:
    """A network of one generated cell, optionally between stateless layers, as a `Case`."""
    layers = [LayerSpec("generated", cell.input_size, cell.hidden, cell=cell)]
    if before is not None:
        layers.insert(0, LayerSpec(before, cell.input_size, cell.input_size))
    if after is not None:
        layers.append(LayerSpec(after, cell.hidden, 2))
    return Case(NetworkSpec(tuple(layers), bare=False), seed=0, length=3)


def _one_leaf_cell(ops, declaration, violation=None) -> CellSpec:
    """A one-leaf cell of the given ops, a per-neuron bias, a shared gain, activations held
    as fields."""
    return CellSpec(
        input_size=3,
        hidden=3,
        tokens=False,
        ops=ops,
        declaration=declaration,
        leaves=(LeafSpec("plain", "tanh"),),
        chunk_slots=tuple((0, "drive") for op in ops for _ in range(op.width)),
        per_neuron=True,
        shared=1,
        output="state",
        functions_as_fields=True,
        violation=violation,
    )


_FROM_X = Source("x", "identity")
#: Explicit examples, run first by every profile. Neighbours mixed outside any op: every
#: diagonal rule must refuse.
_MIXING = _generated(
    _one_leaf_cell((OpSpec("linear", 1, (_FROM_X,)),), (0,), "roll"), after="linear"
)
#: Two ops of one shape, declared in the reverse of their call order and reading different
#: inputs (`x` and `tanh(h)`): probes and records must be paired by identity, not by position.
_OUT_OF_ORDER = _generated(
    _one_leaf_cell(
        (OpSpec("masked", 1, (_FROM_X,)), OpSpec("eqx", 1, (Source("h0", "tanh"),))), (1, 0)
    ),
    before="function",
    after="mlp",
)
#: The output leaf `h0` reads `h1` only through an op's input (cut by the diagonal rules), and
#: the op `op0` reaches only `h1`: a rule that cannot credit `op0` must say so, not give it a
#: silent zero gradient.
_RELAY = _generated(
    CellSpec(
        input_size=3,
        hidden=3,
        tokens=False,
        ops=(OpSpec("eqx", 1, (_FROM_X,)), OpSpec("linear", 1, (Source("h1", "identity"),))),
        declaration=(0, 1),
        leaves=(LeafSpec("plain", "tanh"), LeafSpec("plain", "tanh")),
        chunk_slots=((1, "drive"), (0, "drive")),
        per_neuron=False,
        shared=0,
        output="h0",
        functions_as_fields=False,
        violation=None,
    )
)

#: A two-leaf element-wise cell under a leaky read-out: e-prop's filtered traces are exact
#: where per-layer D-RTRL is not.
_LEAKY_READOUT = _generated(
    CellSpec(
        input_size=3,
        hidden=3,
        tokens=False,
        ops=(OpSpec("eqx", 1, (_FROM_X,)), OpSpec("linear", 1, (_FROM_X,))),
        declaration=(1, 0),
        leaves=(LeafSpec("plain", "tanh"), LeafSpec("leaky", "softplus")),
        chunk_slots=((1, "drive"), (0, "drive")),
        per_neuron=True,
        shared=1,
        output="mix",
        functions_as_fields=False,
        violation=None,
    ),
    after="readout",
)

#: A cell without parameters (a delay line of two steps) before an element-wise cell: every
#: per-layer rule runs it without a trace, and D-RTRL stays exact.
_ELEMENTWISE_FROM_X = dataclasses.replace(
    _one_leaf_cell((OpSpec("linear", 1, (_FROM_X,)),), (0,)), input_size=6
)
_DELAYED = Case(
    NetworkSpec(
        (
            LayerSpec("function", 3, 3),
            LayerSpec("delay", 3, 6),
            LayerSpec("generated", 6, 3, cell=_ELEMENTWISE_FROM_X),
            LayerSpec("mlp", 3, 2),
        ),
        bare=False,
    ),
    seed=0,
    length=4,
)


@examples(1)
@given(case=cases, drawn=drawn_rules, uoro_seed=st.integers(0, 2**16))
@example(case=_MIXING, drawn=eqtrace.PPProp(rank=3), uoro_seed=0)
@example(case=_OUT_OF_ORDER, drawn=eqtrace.SnAp(2), uoro_seed=1)
@example(case=_RELAY, drawn=eqtrace.PPProp(rank=2), uoro_seed=2)
@example(case=_LEAKY_READOUT, drawn=eqtrace.PPProp(input_decay=0.3, output_decay=0.6), uoro_seed=3)
@example(case=_DELAYED, drawn=eqtrace.SnAp(3), uoro_seed=4)
@releasing_compiled_code
def test_online_rules_against_oracles(case, drawn, uoro_seed):
    """On a random network from a random state:

    1. exact RTRL, summed over online steps, equals BPTT;
    2. every diagonal rule (D-RTRL, SnAp-1 and a drawn pp-prop or SnAp-n) equals RTRL at the
       first step, or refuses with a `ValueError` naming the offending op, parameter or state
       leaf; `eqtrace.check` reports exactly that refusal (and no violation when the rule accepts);
    3. RTRL and every accepting rule give every parameter a finite gradient, non-zero where
       BPTT's is not; and D-RTRL and SnAp-1 equal BPTT where they are exact by theory;
    4. UORO's online gradient, averaged over many keys, equals RTRL's within its standard
       error;
    5. the drawn rule in one exact window of the whole sequence (`ExactWindows`) equals BPTT.
    """
    p = materialise(case)
    every, first = weights(case.length), weights(case.length, first_only=True)
    _, bptt, _ = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(p.static),
        weighted_loss,
        p.params,
        p.state,
        p.xs,
        (p.targets, every),
        reduction="sum",
    )
    rtrl = eqtrace.RTRL()
    step = eqtrace.make_online_step(rtrl, p.static)
    trace = rtrl.init_trace(p.model, p.state, p.xs[0])
    _, exact, _, _ = online(step, p, trace, every)
    assert_close(exact, bptt, 1e-8, "RTRL vs BPTT")
    assert_gradient_everywhere(exact, bptt, "RTRL")
    _, exact_first, _, _ = online(step, p, trace, first)
    assert_unbiased(p, eqtrace.UORO(key=jr.key(0)), uoro_seed, every, exact)

    # e-prop is D-RTRL unless a cell feeds a leaky read-out: run it where it differs.
    leaky_readout = any(layer.kind == "readout" for layer in case.spec.layers)
    eprop = (eqtrace.EProp(),) if leaky_readout else ()
    for algorithm in (eqtrace.DRTRL(), eqtrace.SnAp1(), *eprop, drawn):
        trace, refusal = init_or_refusal(algorithm, p.model, p.state, p.xs[0])
        report = structure_report(p.model, algorithm, p.xs[0])
        event(f"{type(algorithm).__name__} {'refuses' if refusal else 'accepts'}")
        if refusal is not None:
            assert_deliberate_refusal(algorithm, p.model, refusal, report)
            continue
        assert report.ok, f"{algorithm} accepts a model that `eqtrace.check` flags:\n{report}"
        step = eqtrace.make_online_step(algorithm, p.static)
        _, first_step, _, _ = online(step, p, trace, first)
        assert_close(first_step, exact_first, 1e-9, f"{algorithm} vs RTRL at the first step")
        _, grads, _, _ = online(step, p, trace, every)
        assert_gradient_everywhere(grads, bptt, str(algorithm))
        if isinstance(algorithm, (eqtrace.DRTRL, eqtrace.SnAp1)) and case.spec.drtrl_exact:
            event(f"{type(algorithm).__name__} exact by theory")
            assert_close(grads, bptt, 1e-8, f"{algorithm} vs BPTT on an element-wise layer")
        if isinstance(algorithm, eqtrace.EProp) and case.spec.eprop_exact:
            event("e-prop exact by theory")
            assert_close(grads, bptt, 1e-8, "e-prop vs BPTT on an element-wise-recurrent layer")
        if algorithm is drawn:  # one rule per example: each window compiles afresh
            windows = eqtrace.make_online_block(eqtrace.ExactWindows(algorithm), p.static)
            _, whole, _, _ = online(windows, p, trace, every, block_size=case.length)
            assert_close(whole, bptt, 1e-8, f"ExactWindows({algorithm}), one window, vs BPTT")


def step_value_and_grad(step, params, state, trace, x, target):
    """The loss of one online step, its online gradient, and the new state and trace."""

    def loss(params):
        new_state, new_trace, y = step(params, state, trace, x)
        return jnp.sum((y - target) ** 2), (new_state, new_trace)

    return jax.value_and_grad(loss, has_aux=True)(params)


#: A token network for the transformations: an embedding used twice and a masked recurrent
#: op on a two-leaf cell, then a built-in leaky read-out and a custom stateless layer.
_TOKENS = Case(
    NetworkSpec(
        (
            LayerSpec(
                "generated",
                4,
                3,
                cell=CellSpec(
                    input_size=4,
                    hidden=3,
                    tokens=True,
                    ops=(
                        OpSpec("masked", 1, (Source("h1", "sin"),)),
                        OpSpec("embedding", 2, (_FROM_X, _FROM_X)),
                    ),
                    declaration=(1, 0),
                    leaves=(LeafSpec("gated", "gelu"), LeafSpec("leaky", "softplus")),
                    chunk_slots=((1, "drive"), (0, "drive"), (0, "gate")),
                    per_neuron=True,
                    shared=2,
                    output="mix",
                    functions_as_fields=True,
                    violation=None,
                ),
            ),
            LayerSpec("readout", 3, 2),
            LayerSpec("pointwise", 2, 2),
        ),
        bare=False,
    ),
    seed=1,
    length=4,
)


@examples(1)
@given(
    case=cases,
    algorithm=st.one_of(st.just(eqtrace.RTRL()), diagonal_rules, uoro_rules),
    batch=st.integers(2, 3),
    block=st.integers(1, 4),
)
@example(case=_TOKENS, algorithm=eqtrace.DRTRL(), batch=2, block=2)
@example(
    # Delay lines with parameters before them and cells after them, in blocks.
    case=Case(
        NetworkSpec(
            (
                LayerSpec("linear", 3, 3),
                LayerSpec("delay", 3, 6),
                LayerSpec("rnn", 6, 3),
                LayerSpec("delay", 3, 6),
                LayerSpec("generated", 6, 3, cell=_ELEMENTWISE_FROM_X),
            ),
            bare=False,
        ),
        seed=1,
        length=4,
    ),
    algorithm=eqtrace.SnAp1(),
    batch=2,
    block=2,
)
@example(
    # UORO's blocks on the cells its first block form failed on (its derivative transposed a
    # JVP of the cell batched over the block's steps): a `lax.cond` on the state, then a spiking
    # layer whose reset is detached by `stop_gradient`.
    case=Case(
        NetworkSpec(
            (
                LayerSpec(
                    "generated",
                    3,
                    3,
                    cell=dataclasses.replace(
                        _one_leaf_cell((OpSpec("linear", 1, (_FROM_X,)),), (0,)), cond_gate=True
                    ),
                ),
                LayerSpec(
                    "lif",
                    3,
                    3,
                    options=(("detach_reset", True), ("recurrent", True), ("threshold", 0.5)),
                ),
                LayerSpec("linear", 3, 2),
            ),
            bare=False,
        ),
        seed=2,
        length=4,
    ),
    algorithm=eqtrace.UORO(key=jr.key(3)),
    batch=2,
    block=2,
)
@releasing_compiled_code
def test_blocks_batches_and_jit(case, algorithm, batch, block):
    """For one rule per example (exact RTRL instead if a diagonal rule refuses the model):

    1. an online block (`make_online_block`, `block_size=gcd(block, T)`) equals stepping: loss,
       gradient, final state and trace;
    2. `jax.vmap` over a batch equals a Python loop over its samples;
    3. a jitted step (value and online gradient) equals the same step without jit.
    """
    p = materialise(case, batch)
    sample = [
        p._replace(
            state=jtu.tree_map(lambda a: a[b], p.state), xs=p.xs[:, b], targets=p.targets[:, b]
        )
        for b in range(batch)
    ]
    x = sample[0].xs[0]
    trace, refusal = init_or_refusal(algorithm, p.model, sample[0].state, x)
    if refusal is not None:
        algorithm = eqtrace.RTRL()
        trace = algorithm.init_trace(p.model, sample[0].state, x)
    event(type(algorithm).__name__)
    every = weights(case.length)

    _, traces = eqtrace.init_state_and_trace(p.model, algorithm, batch_size=batch, x=x)
    # Each sample with its slice of the batched trace (its own key, for UORO).
    sample_traces = [jtu.tree_map(lambda a, b=b: a[b], traces) for b in range(batch)]
    step = eqtrace.make_online_step(algorithm, p.static)
    stepped = online(step, sample[0], sample_traces[0], every)
    online_block = eqtrace.make_online_block(algorithm, p.static)
    # Blocks that tile the sequence: a shorter last block would compile once more (remainders
    # are covered in test_blocks.py).
    block_size = math.gcd(block, case.length)
    blocked = online(online_block, sample[0], sample_traces[0], every, block_size=block_size)
    assert_close(blocked, stepped, 1e-10, f"{algorithm} online block of {block_size} vs steps")

    loop = [stepped] + [online(step, s, t, every) for s, t in zip(sample[1:], sample_traces[1:])]
    batched = eqtrace.online_gradient(
        jax.vmap(step, in_axes=(None, 0, 0, 0)),
        batch_loss,
        p.params,
        p.state,
        traces,
        p.xs,
        (p.targets, every),
        reduction="sum",
    )
    mean_loss, mean_grads = jtu.tree_map(lambda *a: sum(a) / batch, *[r[:2] for r in loop])
    stacked = jtu.tree_map(lambda *a: jnp.stack(a), *[r[2:] for r in loop])
    assert_close(batched, (mean_loss, mean_grads, *stacked), 1e-10, f"{algorithm} vmap vs loop")

    _, _, state, trace = stepped
    args = (step, p.params, state, trace, x, sample[0].targets[0])
    jitted = eqx.filter_jit(step_value_and_grad)(*args)
    with jax.disable_jit():
        eager = step_value_and_grad(*args)
    assert_close(jitted, eager, 1e-9, f"{algorithm} jit vs no jit")
