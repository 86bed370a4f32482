"""Online blocks (`AbstractAlgorithm.steps`, `make_online_block`, `online_gradient(block_size=)`):
the same states, traces and gradients as stepping, for every algorithm. D-RTRL's blocks use a
different computation (one pass over the trace per block), so they are held to the step-by-step
path, and through it to BPTT where D-RTRL is exact. Rules are paired with models, cells and
block sizes (`helpers.pairs`); `EQTRACE_HYPOTHESIS_PROFILE=long` runs every pair."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest

import eqtrace
from eqtrace import nn
from eqtrace._algorithms import _drtrl
from helpers import (
    LONG,
    LeakyCurrent,
    TokenCell,
    alternate,
    pairs,
    relative_error,
    squared_loss,
)
from registry import EVERY_CELL, algorithms, cells, make_cell, rules


#: The rules that compute a block their own way rather than by scanning their step.
OWN_BLOCKS = algorithms(supports_blocks=True, own_blocks=True)
#: The rules with one trace per layer. A rule with one dense trace for the whole network
#: (RTRL) is costly to compile on these networks: its scanned blocks are held to stepping on
#: the stacked network only.
PER_LAYER_BLOCKS = algorithms(supports_blocks=True, per_layer=True)


def _block_models(case) -> list[str]:
    if case.own_blocks:
        return ["lif", "stack", "alif"]
    return ["lif", "stack"] if case.per_layer else ["stack"]


def _block_cases() -> list:
    """Each rule on the models of `_block_models`: all of them under `LONG`, else one: for a
    rule with its own block computation, rotating with the rule's place in the registry; for a
    rule whose blocks scan its steps (the same machinery for every such rule), the stacked
    network. The LIF network is held to stepping by `test_own_blocks_any_size` (the rules with
    their own blocks) and `test_train_online_with_blocks` (every per-layer rule)."""
    params = []
    for i, case in enumerate(rules(supports_blocks=True)):
        if case.name == "lowrank" and not LONG:  # its blocks scan its steps, as SnAp-n's do
            continue
        models = _block_models(case)
        default = models[i % len(models)] if case.own_blocks else "stack"
        for model_name in models if LONG else [default]:
            params.append(pytest.param(case.algorithm, model_name, id=f"{case.name}-{model_name}"))
    return params


INPUT, BATCH, LENGTH, BLOCK = 3, 2, 11, 4  # 11 = 2 blocks of 4 and a remainder of 3


def _models(key):
    keys = jr.split(key, 8)
    return {
        # Spiking: a current leaf, recurrent weights, learnt time constants, a leaky read-out.
        "lif": nn.Sequential(
            [
                nn.LIF(
                    INPUT,
                    5,
                    recurrent=True,
                    synapse=True,
                    learn_tau=True,
                    threshold=0.2,
                    key=keys[0],
                ),
                nn.LeakyReadout(5, 2, key=keys[1]),
            ]
        ),
        # Input credit into a first layer, a GRU's fused gates, a shared scalar parameter.
        "stack": nn.Sequential(
            [
                eqx.nn.Linear(INPUT, 4, key=keys[2]),
                nn.GRUCell(4, 5, key=keys[3]),
                LeakyCurrent(5, 3, key=keys[4]),
                eqx.nn.Linear(3, 2, key=keys[5]),
            ]
        ),
        "alif": nn.Sequential(
            [
                nn.ALIF(INPUT, 4, recurrent=True, learn_tau=True, learn_beta=True, key=keys[6]),
                eqx.nn.Linear(4, 2, key=keys[7]),
            ]
        ),
    }


def _data(key, length=LENGTH):
    xkey, tkey = jr.split(key)
    # Inputs large enough that the spiking layers fire.
    return 2 * jr.normal(xkey, (length, BATCH, INPUT)), jr.normal(tkey, (length, BATCH, 2))


def _batch_loss(y, target):
    return jnp.sum((y - target) ** 2) / BATCH


def _stepped_and_blocked(algorithm, model, xs, targets, block_size=BLOCK):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, BATCH)
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    block = jax.vmap(
        eqtrace.make_online_block(algorithm, static), in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1)
    )
    stepped = eqtrace.online_gradient(
        step, _batch_loss, params, state, trace, xs, targets, reduction="sum"
    )
    blocked = eqtrace.online_gradient(
        block,
        _batch_loss,
        params,
        state,
        trace,
        xs,
        targets,
        block_size=block_size,
        reduction="sum",
    )
    return stepped, blocked


@pytest.mark.parametrize("algorithm, model_name", _block_cases())
def test_blocks_equal_steps(algorithm, model_name, getkey):
    model = _models(getkey())[model_name]
    xs, targets = _data(getkey())
    if model_name == "lif":  # the test exercises the spiking regime
        lif = model.layers[0]
        init = jax.vmap(lambda _: lif.init_state())(xs[0])
        _, spikes = jax.lax.scan(lambda s, x: jax.vmap(lif)(s, x), init, xs)
        assert 0 < float(jnp.mean(spikes)) < 1
    stepped, blocked = _stepped_and_blocked(algorithm, model, xs, targets)
    (loss, grads, state, trace), (block_loss, block_grads, block_state, block_trace) = (
        stepped,
        blocked,
    )
    assert relative_error(block_loss, loss) <= 1e-12
    assert relative_error(block_grads, grads) <= 1e-10
    assert relative_error(block_state, state) <= 1e-12
    assert relative_error(block_trace, trace) <= 1e-10
    # Not vacuous: every parameter gets a gradient.
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name, algorithm", pairs(EVERY_CELL, OWN_BLOCKS))
def test_own_blocks_every_cell(name, algorithm, getkey):
    """Every built-in cell (multi-leaf blocks, complex-valued LRU leaves, read-out ops,
    per-neuron parameters) through a rule's own block computation, against stepping."""
    cell = make_cell(name, getkey())
    xs = 3 * jr.normal(getkey(), (5, BATCH, 3))
    y_shape = jax.eval_shape(cell.output, cell.init_state()).shape
    targets = jr.normal(getkey(), (5, BATCH, *y_shape))
    (_, grads, state, trace), (_, block_grads, block_state, block_trace) = _stepped_and_blocked(
        algorithm, cell, xs, targets, block_size=2
    )
    assert relative_error(block_grads, grads) <= 1e-10
    assert relative_error(block_state, state) <= 1e-12
    assert relative_error(block_trace, trace) <= 1e-10


@pytest.mark.parametrize("block_size, algorithm", pairs([1, 3, LENGTH, 2 * LENGTH], OWN_BLOCKS))
def test_own_blocks_any_size(block_size, algorithm, getkey):
    model = _models(getkey())["lif"]
    xs, targets = _data(getkey())
    (_, grads, _, trace), (_, block_grads, _, block_trace) = _stepped_and_blocked(
        algorithm, model, xs, targets, block_size
    )
    assert relative_error(block_grads, grads) <= 1e-10
    assert relative_error(block_trace, trace) <= 1e-10


@pytest.mark.parametrize(
    "algorithm",
    [
        pytest.param(eqtrace.DRTRL(), id="drtrl"),
        pytest.param(eqtrace.SnAp1(), id="snap1"),
        pytest.param(eqtrace.EProp(), id="eprop"),
    ],
)
def test_long_blocks_sum_by_a_matrix_product(algorithm, getkey, monkeypatch):
    """Blocks longer than `UNROLLED_BLOCK` steps sum their immediate terms by one matrix
    product per op, shorter ones by rank-one terms: both held to stepping (here with the
    threshold lowered, so that the blocks of 4 and the remainder of 3 take the product)."""
    monkeypatch.setattr(_drtrl, "UNROLLED_BLOCK", 2)
    model = _models(getkey())["lif"]
    xs, targets = _data(getkey())
    (_, grads, _, trace), (_, block_grads, _, block_trace) = _stepped_and_blocked(
        algorithm, model, xs, targets
    )
    assert relative_error(block_grads, grads) <= 1e-10
    assert relative_error(block_trace, trace) <= 1e-10


@pytest.mark.parametrize(
    "name, algorithm",
    pairs(
        cells(["leaky-tanh", "leaky-current"], elementwise=True),
        algorithms(exact_elementwise=True, exact=False, supports_blocks=True),
    ),
)
def test_blocks_equal_bptt_for_elementwise_layer(name, algorithm, getkey):
    """DESIGN §5 oracle 2 through the block path: exact for an element-wise recurrence."""
    model = nn.Sequential([make_cell(name, getkey(), INPUT, 4), eqx.nn.Linear(4, 2, key=getkey())])
    xs, targets = _data(getkey())
    xs, targets = xs[:, 0], targets[:, 0]
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = model.init_state()
    trace = algorithm.init_trace(model, state, xs[0])
    block = eqtrace.make_online_block(algorithm, static)
    _, online, _, _ = eqtrace.online_gradient(
        block, squared_loss, params, state, trace, xs, targets, block_size=BLOCK, reduction="sum"
    )
    _, bptt, _ = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(static), squared_loss, params, state, xs, targets, reduction="sum"
    )
    assert relative_error(online, bptt) <= 1e-10


@pytest.mark.parametrize("algorithm", OWN_BLOCKS)
def test_embedding_and_masked_ops_in_blocks(algorithm, getkey):
    cell = TokenCell(leak=0.5, key=getkey())
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    tokens = jr.randint(getkey(), (LENGTH,), 0, 5)
    targets = jr.normal(getkey(), (LENGTH, 4))
    state = cell.init_state()
    trace = algorithm.init_trace(cell, state, tokens[0])
    args = (squared_loss, params, state, trace, tokens, targets)
    stepped = eqtrace.online_gradient(
        eqtrace.make_online_step(algorithm, static), *args, reduction="sum"
    )
    blocked = eqtrace.online_gradient(
        eqtrace.make_online_block(algorithm, static), *args, block_size=BLOCK, reduction="sum"
    )
    assert relative_error(blocked, stepped) <= 1e-10
    grads = blocked[1]
    assert bool(jnp.all(grads.recurrent.weight[~cell.recurrent.mask] == 0))


# `steps` against a loop of jitted steps, and `train_online` in blocks against stepping: each
# rule through one of the two (all through both under `LONG`).
@pytest.mark.parametrize("algorithm", alternate(PER_LAYER_BLOCKS, 1))
def test_steps_outputs_and_jit(algorithm, getkey):
    model = _models(getkey())["stack"]
    xs = jr.normal(getkey(), (4, INPUT))
    state = model.init_state()
    trace = algorithm.init_trace(model, state)
    stepped_ys = []
    stepped_state, stepped_trace = state, trace
    # A jitted step (itself held to the eager one in test_diagonal.py and test_foundation.py):
    # an eager loop would compile each primitive of the rule one by one.
    step = eqx.filter_jit(algorithm.step)
    for x in xs:
        stepped_state, stepped_trace, y = step(model, stepped_state, stepped_trace, x)
        stepped_ys.append(y)
    eager = algorithm.steps(model, state, trace, xs)
    jitted = eqx.filter_jit(algorithm.steps)(model, state, trace, xs)
    assert relative_error(eager, (stepped_state, stepped_trace, jnp.stack(stepped_ys))) <= 1e-12
    assert relative_error(jitted, eager) <= 1e-12


def test_blocks_reject_bad_arguments(getkey):
    model = nn.GRUCell(INPUT, 4, key=getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = model.init_state()
    block = eqtrace.make_online_block(eqtrace.DRTRL(), static)
    xs = jnp.zeros((LENGTH, INPUT))
    ppprop_trace = eqtrace.PPProp(0.5).init_trace(model, state)
    with pytest.raises(ValueError, match="trace"):
        block(params, state, ppprop_trace, xs)
    trace = eqtrace.DRTRL().init_trace(model, state)
    with pytest.raises(ValueError, match="x"):
        block(params, state, trace, jnp.zeros((LENGTH, INPUT + 1)))
    with pytest.raises(ValueError, match="block_size"):
        eqtrace.online_gradient(
            block,
            squared_loss,
            params,
            state,
            trace,
            xs,
            jnp.zeros((LENGTH, 4)),
            block_size=0,
            reduction="sum",
        )


def test_drtrl_blocks_check_finite(getkey):
    model = nn.GRUCell(INPUT, 4, key=getkey())
    algorithm = eqtrace.DRTRL(check_finite=True)
    state = model.init_state()
    trace = algorithm.init_trace(model, state)
    xs = jnp.zeros((LENGTH, INPUT)).at[2, 0].set(jnp.nan)
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(algorithm.steps(model, state, trace, xs))


def test_drtrl_blocks_bfloat16_traces(getkey):
    model = _models(getkey())["lif"]
    xs, targets = _data(getkey())
    (_, grads, _, _), (_, block_grads, _, block_trace) = _stepped_and_blocked(
        eqtrace.DRTRL(trace_dtype=jnp.bfloat16), model, xs, targets
    )
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(block_trace[0].ops))
    # Rounded at block ends rather than at every step: close, not equal.
    assert relative_error(block_grads, grads) <= 3e-2


def test_train_with_blocks(getkey):
    """Plain optax on block gradients: a short training run reduces the loss."""
    model = _models(getkey())["stack"]
    xs, _ = _data(getkey(), length=40)
    targets = jnp.tanh(jnp.cumsum(xs[..., :2], axis=0) / 4)  # depends on the input history
    algorithm = eqtrace.DRTRL()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    block = jax.vmap(
        eqtrace.make_online_block(algorithm, static), in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1)
    )
    optimizer = optax.adam(1e-1)
    opt_state = optimizer.init(params)
    losses = []
    # Every sequence starts from the same initial state and trace (the model's structure, which
    # `init_state_and_trace` analyses, does not change with the parameters).
    state, trace = eqtrace.init_state_and_trace(model, algorithm, BATCH)
    for _ in range(30):
        loss, grads, _, _ = eqtrace.online_gradient(
            block, _batch_loss, params, state, trace, xs, targets, block_size=10, reduction="sum"
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("algorithm", alternate(PER_LAYER_BLOCKS, 0))
def test_train_online_with_blocks(algorithm, getkey):
    """One update per block with the mean of its steps' online gradients: against a loop of
    stepped `online_gradient` calls, and against `optax.MultiSteps` on the stepped version
    (which averages in lower precision, hence the looser tolerance there)."""
    model = _models(getkey())["lif"]
    xs, targets = _data(getkey(), length=12)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, BATCH)
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    block = jax.vmap(
        eqtrace.make_online_block(algorithm, static), in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1)
    )
    sgd = optax.sgd(0.5)
    blocked = eqtrace.train_online(
        block, _batch_loss, sgd, params, sgd.init(params), state, trace, xs, targets,
        block_size=4,
    )  # fmt: skip
    block_params, _, block_state, block_trace, block_losses = blocked
    assert block_losses.shape == (12,)

    looped, looped_state, looped_trace = params, state, trace
    for start in range(0, 12, 4):
        _, grads, looped_state, looped_trace = eqtrace.online_gradient(
            step, _batch_loss, looped, looped_state, looped_trace,
            xs[start : start + 4], targets[start : start + 4], reduction="sum",
        )  # fmt: skip
        looped = jax.tree.map(lambda p, g: p - 0.5 * g / 4, looped, grads)
    assert relative_error(block_params, looped) <= 1e-10
    assert relative_error(block_state, looped_state) <= 1e-10
    assert relative_error(block_trace, looped_trace) <= 1e-10
    assert relative_error(block_params, params) > 1e-4  # three updates happened

    multi = optax.MultiSteps(sgd, every_k_schedule=4)
    stepped = eqtrace.train_online(
        step, _batch_loss, multi, params, multi.init(params), state, trace, xs, targets
    )
    assert relative_error(block_params, stepped[0]) <= 1e-6
    assert relative_error(block_losses, stepped[4]) <= 1e-6
    # A block size that does not divide the length: the last, shorter block takes the
    # remainder, as in `online_gradient` (checked in test_loss_options).
    *_, remainder_losses = eqtrace.train_online(
        block, _batch_loss, sgd, params, sgd.init(params), state, trace, xs, targets,
        block_size=5,
    )  # fmt: skip
    assert remainder_losses.shape == block_losses.shape


def test_run_online_in_blocks_equals_steps(getkey):
    """`run_online(block, ..., block_size=C)` gives the outputs, state and trace of the steps,
    with a last block shorter than `C`."""
    model = _models(getkey())["stack"]
    algorithm = eqtrace.DRTRL()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state, trace = eqtrace.init_state_and_trace(model, algorithm, batch_size=2)
    xs = jr.normal(getkey(), (5, 2, INPUT))
    step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
    block = jax.vmap(
        eqtrace.make_online_block(algorithm, static), in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1)
    )
    stepped = eqtrace.run_online(step, params, state, trace, xs)
    blocked = eqtrace.run_online(block, params, state, trace, xs, block_size=2)
    assert relative_error(blocked, stepped) <= 1e-12
