"""Learning results, task × rule × model: test accuracy, memory per sample, time per update and
the cosine of the online gradient to BPTT's, written to a JSON file and plotted from it.

    python -m benchmarks.tasks --out benchmarks/results/tasks.json          # the published table
    python -m benchmarks.tasks --fast --out /tmp/smoke.json                 # CI smoke, seconds
    python -m benchmarks.tasks --plot benchmarks/results/tasks.json         # PNGs + markdown
    python -m benchmarks.tasks --tasks mnist1d --rules drtrl \\
        --set mnist1d.hidden=256 --set mnist1d.block=13 --out benchmarks/results/x.json

Tasks (`eqtrace.tasks`) and models:

- `mnist1d`: MNIST-1D (40 steps, 10 classes), `Sequential([GRUCell(1, H), eqx.nn.Linear(H, 10)])`,
  cross-entropy on the last step (or on every step with `--set mnist1d.loss=all`). Other
  models: `mnist1d.cell` (a key of `MNIST1D_CELLS`), `mnist1d.delay=K` (an
  `eqtrace.nn.DelayLine(1, K)` in front), `mnist1d.legendre=d` (an
  `eqtrace.nn.LegendreMemory(1, d, θ)` in front, θ = `mnist1d.legendre_window`),
  `mnist1d.readout=W` (an MLP read-out of width `W`),
  `mnist1d.leaky_tau=τ` (a `LeakyReadout` after the cell); `mnist1d.noise=σ` adds Gaussian
  noise to the training inputs (a regulariser; the same noise for every rule).
- `dms`: delayed match-to-sample, `Sequential([ALIF(n_in, H, recurrent=True), LeakyReadout(H, 2)])`,
  cross-entropy in the test window.
- `evidence`: evidence accumulation, the same spiking network, cross-entropy in the recall
  window.

Rules (`RULES`): `drtrl` (`eqtrace.DRTRL()`), `ppprop` (`eqtrace.PPProp(decay=...)`, the task's
`ppprop_decay`, or `ppprop@0.999` for another decay), `snap1`, `eprop`, `snap1-filtered`
(`eqtrace.Filtered(eqtrace.SnAp1())`: SnAp-1's traces through the read-out's leak), `uoro`,
`drtrl-window` (D-RTRL in exact windows of `block` steps, the last one ending at the loss),
`lowrank@R` (`eqtrace.LowRankRTRL(rank=R)`, D-RTRL plus a rank-R correction; `lowrank` alone:
R = 4) and `bptt` (`eqtrace.bptt_gradient`). Each update draws a batch, computes the gradient of
the task's loss with the rule through the drivers (`eqtrace.online_gradient` / `run_online` /
`bptt_gradient`) and applies Adam (global-norm clipping at 1, cosine decay of the learning rate).
For the spiking tasks the per-sample mask of the decision window travels with the labels,
`(targets, mask)`, into the loss; the online rules run the trace forward without gradient work up
to the window (it holds no loss) and take the online gradient over the window only, in online
blocks of `block` steps.

Recorded per (task, rule, seed): the test accuracy (last and best of the evaluations), the
memory per sample (the trace from `eqtrace.trace_size`; for BPTT the states of all `T` steps, a
lower bound of what autodiff stores), the median wall time of one update after compilation,
and, after training, `eqtrace.compare_gradients` of the rule's gradient against
`eqtrace.bptt_gradient` of the same loss on one held-out batch (overall cosine and norm ratio).
The JSON also holds the machine, the versions, the date, the command and the full configuration.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax

import eqtrace


ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule the harness can run: its label, how to build it (from pp-prop's decay or
    low-rank RTRL's rank, `None` for the others; `None` for BPTT, which has no online rule)
    and its plot style."""

    label: str
    make: Callable[[float | None], Any]
    color: str
    marker: str


#: One line per rule. `ppprop` takes its decay from the task's `ppprop_decay` or `ppprop@0.999`.
RULES: dict[str, Rule] = {
    "drtrl": Rule("D-RTRL", lambda decay: eqtrace.DRTRL(), "tab:blue", "o"),
    "ppprop": Rule("pp-prop", lambda decay: eqtrace.PPProp(decay=decay), "tab:orange", "s"),
    "snap1": Rule("SnAp-1", lambda decay: eqtrace.SnAp1(), "tab:red", "X"),
    "eprop": Rule("e-prop", lambda decay: eqtrace.EProp(), "tab:brown", "D"),
    "snap1-filtered": Rule(
        "SnAp-1, filtered", lambda decay: eqtrace.Filtered(eqtrace.SnAp1()), "tab:pink", "*"
    ),
    "uoro": Rule("UORO", lambda decay: eqtrace.UORO(key=jr.key(0)), "tab:purple", "v"),
    "drtrl-window": Rule(
        "D-RTRL, exact windows",
        lambda decay: eqtrace.ExactWindows(eqtrace.DRTRL()),
        "tab:cyan",
        "P",
    ),
    # `lowrank@R`: D-RTRL plus a rank-R correction (the parameter passed as `decay`).
    "lowrank": Rule(
        "D-RTRL + low rank",
        lambda rank: eqtrace.LowRankRTRL(rank=int(rank if rank is not None else 4)),
        "tab:olive",
        "*",
    ),
    # `snap@N`: SnAp-N (the parameter passed as `decay`; `snap` alone: N = 2).
    "snap": Rule("SnAp-n", lambda n: eqtrace.SnAp(int(n if n is not None else 2)), "tab:gray", "h"),
    # Synthetic gradients (DNI): BPTT in windows of the task's `block` steps, the credit from
    # beyond each window predicted by a linear `eqtrace.SyntheticGradient` fitted alongside
    # (`dni@LR`: the predictor's learning rate, default `DNI_LR`; `dni@0`: never fitted, i.e.
    # truncated BPTT in the same windows). The parameter passed is `(window, lr)`.
    "dni": Rule("DNI", lambda spec: DNI(*spec), "black", "d"),
    "bptt": Rule("BPTT", lambda decay: None, "tab:green", "^"),
}

#: The predictor's optimiser in `dni` runs: Adam at this constant learning rate (its own, not
#: clipped with the model's gradient).
DNI_LR = 1e-3


@dataclasses.dataclass(frozen=True)
class DNI:
    """The `dni` rule: `eqtrace.synthetic_gradient` in windows of `window` steps, the predictor
    fitted by Adam at `lr`. Not an online rule (no trace): the harness trains the model and its
    predictor together."""

    window: int
    lr: float = DNI_LR


#: pp-prop twice: with the task's decay (the paper's for the spiking tasks) and close to 1.
DEFAULT_RULES = ("drtrl", "ppprop", "ppprop@0.999", "bptt")

#: The recurrent cells the MNIST-1D model may use (`--set mnist1d.cell=mingru`).
MNIST1D_CELLS: dict[str, Callable] = {
    "gru": eqtrace.nn.GRUCell,
    "mingru": eqtrace.nn.MinGRUCell,
    "lstm": eqtrace.nn.LSTMCell,
    "rnn": eqtrace.nn.RNNCell,
}

# The configuration of each task: the data, the model, the training. `--set task.key=value`
# overrides any entry; `--fast` replaces them with `FAST`.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist1d": {
        "hidden": 128,
        "cell": "gru",  # a key of MNIST1D_CELLS
        "delay": 0,  # a DelayLine of this many steps before the cell (0: none)
        "legendre": 0,  # a LegendreMemory of this order before the cell (0: none)
        "legendre_window": 20.0,  # its window θ, in steps
        "readout": 0,  # the hidden width of an MLP read-out (0: a Linear read-out)
        "leaky_tau": 0.0,  # a LeakyReadout of this time constant after the cell (0: none)
        "loss": "last",  # "last": cross-entropy on the last step; "all": mean over all steps
        "steps": 1500,
        "batch": 100,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "noise": 0.0,  # the standard deviation of Gaussian noise added to training inputs
        "ppprop_decay": 0.98,  # rank 100, as examples/demo.py
        "block": 0,  # steps per online block (0: stepping, as the demo)
        "eval_every": 100,
        "num_samples": 5000,
    },
    "dms": {
        "hidden": 128,
        "n_inputs": 100,
        "n_directions": 4,
        "fixation": 50,
        "sample": 100,
        "delay": 300,
        "test": 100,
        "steps": 300,
        "batch": 32,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "ppprop_decay": 0.99,  # Wang et al. (2026) for DMS
        "block": 50,
        "eval_every": 25,
        "test_size": 512,
        "input_gain": 5.0,
        "tau_adapt": 2000.0,
    },
    "evidence": {
        "hidden": 128,
        "population": 25,
        "n_cues": 7,
        "cue": 50,
        "interval": 75,
        "delay": 300,
        "recall": 100,
        "steps": 300,
        "batch": 32,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "ppprop_decay": 0.9,  # Wang et al. (2026) for evidence accumulation
        "block": 50,
        "eval_every": 25,
        "test_size": 512,
        "input_gain": 5.0,
        "tau_adapt": 2000.0,
    },
}
FAST: dict[str, dict[str, Any]] = {
    "mnist1d": {"hidden": 8, "steps": 2, "batch": 16, "eval_every": 1, "num_samples": 200},
    "dms": {
        "hidden": 8,
        "n_inputs": 8,
        "fixation": 2,
        "sample": 5,
        "delay": 10,
        "test": 5,
        "steps": 2,
        "batch": 4,
        "block": 4,
        "eval_every": 1,
        "test_size": 8,
    },
    "evidence": {
        "hidden": 8,
        "population": 2,
        "n_cues": 3,
        "cue": 3,
        "interval": 4,
        "delay": 10,
        "recall": 5,
        "steps": 2,
        "batch": 4,
        "block": 4,
        "eval_every": 1,
        "test_size": 8,
    },
}
TASK_TITLES = {
    "mnist1d": "MNIST-1D",
    "dms": "delayed match-to-sample",
    "evidence": "evidence accumulation",
}


# ----------------------------------------------------------------------------------------------
# Tasks and models


@dataclasses.dataclass
class Task:
    """What training needs from a task: batches, the held-out data, the model, the loss."""

    name: str
    config: dict[str, Any]
    length: int  # T
    window: int  # the steps at the end of the sequence that carry the loss
    classes: int
    model_name: str
    make_model: Callable[[Any], Any]
    train_batch: Callable[[Any, int], tuple[Any, Any]]  # (key, update) -> (xs, targets)
    test_data: Callable[[], tuple[Any, Any]]  # -> (xs, targets) of the whole test set
    held_out_batch: Callable[[], tuple[Any, Any]]  # one batch for the gradient comparison
    loss_fn: Callable  # loss_fn(y, target) of one step of the batch
    spiking: bool
    cache: dict = dataclasses.field(default_factory=dict)  # jitted functions shared by the rules


def make_task(name: str, config: dict[str, Any], seed: int) -> Task:
    if name == "mnist1d":
        return _mnist1d_task(config, seed)
    if name in ("dms", "evidence"):
        return _spiking_task(name, config, seed)
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(DEFAULTS)}")


def _cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _mnist1d_task(config, seed) -> Task:
    data = eqtrace.tasks.mnist1d(42, num_samples=config["num_samples"])
    length = data["x_train"].shape[1]
    batch = config["batch"]
    if config["loss"] not in ("last", "all"):
        raise ValueError(f"mnist1d.loss must be 'last' or 'all', not {config['loss']!r}")
    n = len(data["y_train"])
    rng = np.random.default_rng(seed)
    orders: list[np.ndarray] = []

    def train_batch(key, update):
        # Epochs of shuffled mini-batches, the same for every rule with this seed.
        per_epoch = n // batch
        epoch, i = divmod(update, per_epoch)
        while len(orders) <= epoch:
            orders.append(rng.permutation(n))
        idx = orders[epoch][i * batch : (i + 1) * batch]
        x = data["x_train"][idx]
        if config["noise"]:  # the same noise for every rule: seeded by the seed and update
            x = x + config["noise"] * np.random.default_rng([seed, update]).normal(size=x.shape)
        return jnp.asarray(np.swapaxes(x, 0, 1), jnp.float32), jnp.asarray(data["y_train"][idx])

    def test_data():
        return jnp.asarray(np.swapaxes(data["x_test"], 0, 1)), jnp.asarray(data["y_test"])

    def held_out_batch():
        b = min(batch, len(data["y_test"]))
        return jnp.asarray(np.swapaxes(data["x_test"][:b], 0, 1)), jnp.asarray(data["y_test"][:b])

    cell, delay, order, window, width, hidden, tau = (
        config[k]
        for k in ("cell", "delay", "legendre", "legendre_window", "readout", "hidden", "leaky_tau")
    )
    if cell not in MNIST1D_CELLS:
        raise ValueError(f"mnist1d.cell must be one of {sorted(MNIST1D_CELLS)}, not {cell!r}")
    if delay and order:
        raise ValueError("mnist1d.delay and mnist1d.legendre are alternatives: set one of them.")

    def make_model(key):
        ckey, rkey = jr.split(key)
        layers = [eqtrace.nn.DelayLine(1, delay)] if delay else []
        if order:
            layers.append(eqtrace.nn.LegendreMemory(1, order, window))
        layers.append(MNIST1D_CELLS[cell](max(delay, order, 1), hidden, key=ckey))
        lkey, rkey = jr.split(rkey)
        if tau:  # a leaky read-out (to `width` features if an MLP follows)
            layers.append(eqtrace.nn.LeakyReadout(hidden, width or 10, tau=tau, key=lkey))
        if width:
            size = width if tau else hidden
            layers.append(eqx.nn.MLP(size, 10, width, 1, activation=jax.nn.gelu, key=rkey))
        elif not tau:
            layers.append(eqx.nn.Linear(hidden, 10, key=rkey))
        return eqtrace.nn.Sequential(layers)

    model_name = f"{MNIST1D_CELLS[cell].__name__.removesuffix('Cell')}({hidden})"
    if tau:
        model_name += f" + LeakyReadout(τ={tau:g})"
    if width or not tau:
        model_name += f" + MLP({width})" if width else " + Linear"
    if delay:
        model_name = f"DelayLine({delay}) + {model_name}"
    if order:
        model_name = f"LegendreMemory({order}, θ={window:g}) + {model_name}"

    return Task(
        name="mnist1d",
        config=config,
        length=length,
        window=1 if config["loss"] == "last" else length,
        classes=10,
        model_name=model_name,
        make_model=make_model,
        train_batch=train_batch,
        test_data=test_data,
        held_out_batch=held_out_batch,
        loss_fn=_cross_entropy,
        spiking=False,
    )


def _spiking_task(name, config, seed) -> Task:
    if name == "dms":
        generate_kwargs = {
            k: config[k]
            for k in ("fixation", "sample", "delay", "test", "n_inputs", "n_directions")
        }
        n_in, window = config["n_inputs"], config["test"]
        length = config["fixation"] + config["sample"] + config["delay"] + config["test"]
        generator = eqtrace.tasks.delayed_match_to_sample
    else:
        generate_kwargs = {
            k: config[k] for k in ("n_cues", "cue", "interval", "delay", "recall", "population")
        }
        n_in, window = 4 * config["population"], config["recall"]
        length = config["n_cues"] * config["interval"] + config["delay"] + config["recall"]
        generator = eqtrace.tasks.evidence_accumulation

    def generate(key, size):
        b = generator(key, size, dtype=jnp.float32, **generate_kwargs)
        return b.inputs, (b.targets, b.mask)

    def train_batch(key, update):
        return generate(jr.fold_in(key, update), config["batch"])

    def test_data():
        return generate(jr.key(1_000_000 + seed), config["test_size"])

    def held_out_batch():
        return generate(jr.key(2_000_000 + seed), config["batch"])

    def make_model(key):
        akey, rkey = jr.split(key)
        alif = eqtrace.nn.ALIF(
            n_in,
            config["hidden"],
            recurrent=True,
            tau_mem=20.0,
            tau_adapt=config["tau_adapt"],
            beta=0.07,
            key=akey,
        )
        # Sparse input spikes leave neurons with the default uniform(±1/√n_in) weights silent;
        # scaled up, as in examples/spiking_working_memory.py.
        alif = eqx.tree_at(
            lambda c: c.input_op.weight, alif, config["input_gain"] * alif.input_op.weight
        )
        return eqtrace.nn.Sequential(
            [alif, eqtrace.nn.LeakyReadout(config["hidden"], 2, tau=20.0, key=rkey)]
        )

    def loss_fn(logits, target):
        # One step: logits (B, 2); labels and the per-sample mask of the window, (B,). The mean
        # cross-entropy over the window's steps and the batch, summed over the steps.
        labels, mask = target
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(mask * losses) / (labels.shape[0] * window)

    return Task(
        name=name,
        config=config,
        length=length,
        window=window,
        classes=2,
        model_name=f"ALIF({config['hidden']}, recurrent) + LeakyReadout",
        make_model=make_model,
        train_batch=train_batch,
        test_data=test_data,
        held_out_batch=held_out_batch,
        loss_fn=loss_fn,
        spiking=True,
    )


# ----------------------------------------------------------------------------------------------
# Rules: one gradient function per (task, rule)


def parse_rule(spec: str, task_config: dict[str, Any]) -> tuple[str, float | None, str]:
    """`drtrl`, `bptt`, `ppprop` (the task's decay) or `ppprop@0.999`: (rule, decay, label)."""
    rule, _, decay_text = spec.partition("@")
    if rule not in RULES:
        raise ValueError(f"unknown rule {spec!r}; choose from {', '.join(RULES)}")
    if rule == "lowrank":
        rank = int(decay_text) if decay_text else 4
        return rule, rank, f"D-RTRL + rank {rank}"
    if rule == "snap":
        n = int(decay_text) if decay_text else 2
        return rule, n, f"SnAp-{n}"
    if rule == "dni":
        size = int(task_config.get("block", 0))
        if size < 1:
            raise ValueError("dni takes its windows from the task: --set TASK.block=K (K ≥ 1)")
        lr = float(decay_text) if decay_text else DNI_LR
        if lr == 0:
            return rule, (size, lr), f"truncated BPTT, windows of {size} (dni@0)"
        suffix = f", predictor lr {lr:g}" if decay_text else ""
        return rule, (size, lr), f"DNI, windows of {size}{suffix}"
    if rule != "ppprop":
        if decay_text:
            raise ValueError(f"only ppprop takes a decay, not {spec!r}")
        if rule == "drtrl-window":
            size = int(task_config.get("block", 0))
            if size < 2:
                raise ValueError(
                    "drtrl-window needs windows of two steps or more: --set TASK.block=K"
                )
            return rule, None, f"D-RTRL, exact windows of {size}"
        return rule, None, RULES[rule].label
    decay = float(decay_text) if decay_text else float(task_config["ppprop_decay"])
    return rule, decay, f"pp-prop α={decay:g}"


def make_algorithm(rule: str, decay: float | None):
    """The online rule `rule` (with pp-prop's `decay`), or `None` for BPTT."""
    return RULES[rule].make(decay)


def _split(tree, start):
    return jtu.tree_map(lambda a: a[:start], tree), jtu.tree_map(lambda a: a[start:], tree)


def _advance_blocks(block, params, state, trace, xs, size):
    """Runs an online block over `xs` in blocks of `size` steps, without any gradient work."""
    length = xs.shape[0]
    full, rest = divmod(length, size)
    if full:
        blocks = xs[: full * size].reshape(full, size, *xs.shape[1:])

        def body(carry, x):
            state, trace, _ = block(params, *carry, x)
            return (state, trace), None

        (state, trace), _ = jax.lax.scan(body, (state, trace), blocks)
    if rest:
        state, trace, _ = block(params, state, trace, xs[full * size :])
    return state, trace


def make_gradient(task: Task, rule: str, algorithm, model, batch: int) -> Callable:
    """`gradient(params, xs, targets) -> (loss, grads)` of the task's loss over one batch."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    length, window = task.length, task.window
    start = length - window  # the steps before the window carry no loss
    sequence_targets = not task.spiking  # MNIST-1D: one label per sequence
    step_weights = None
    reduction = "sum"
    if not task.spiking and task.config["loss"] == "all":
        reduction = "mean"

    if algorithm is None or isinstance(algorithm, DNI):
        forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
        state0 = jax.vmap(lambda _: model.init_state())(jnp.arange(batch))
        if not task.spiking and task.config["loss"] == "last":
            step_weights = jnp.arange(length) == length - 1

    if isinstance(algorithm, DNI):
        # `params` is `(model parameters, predictor)`; the gradient is theirs too: the model's
        # from the windows with the predicted credit, the predictor's from its fitting loss.
        def dni_gradient(params, xs, targets, key=None):
            del key
            model_params, predictor = params
            loss, grads, _, predictor_grads, _ = eqtrace.synthetic_gradient(
                forward,
                task.loss_fn,
                model_params,
                predictor,
                state0,
                xs,
                targets,
                algorithm.window,
                reduction=reduction,
                step_weights=step_weights,
                sequence_targets=sequence_targets,
            )
            return loss, (grads, predictor_grads)

        return dni_gradient

    if algorithm is None:

        def gradient(params, xs, targets, key=None):
            del key  # BPTT draws no noise
            loss, grads, _ = eqtrace.bptt_gradient(
                forward,
                task.loss_fn,
                params,
                state0,
                xs,
                targets,
                reduction=reduction,
                step_weights=step_weights,
                sequence_targets=sequence_targets,
            )
            return loss, grads

        return gradient

    state0, trace0 = eqtrace.init_state_and_trace(model, algorithm, batch_size=batch)
    size = int(task.config.get("block", 0))
    if isinstance(algorithm, eqtrace.ExactWindows) and window < size:
        # An exact window differentiates its steps exactly: the last one must end at the loss
        # and span `size` steps, or a loss on the last step alone would see a one-step window
        # (the wrapped rule). The steps added before the loss window carry a zero weight.
        start = max(length - size, 0)
        step_weights = jnp.arange(length - start) >= length - start - window
    if size:
        step = jax.vmap(
            eqtrace.make_online_block(algorithm, static),
            in_axes=(None, 0, 0, 1),
            out_axes=(0, 0, 1),
        )
    else:
        step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))

    def gradient(params, xs, targets, key=None):
        state, trace = state0, trace0
        if key is not None:  # fresh noise for rules that draw it (UORO); the others ignore it
            state, trace = eqtrace.init_state_and_trace(model, algorithm, batch, key=key)
        if sequence_targets:
            xs_before, xs_window = _split(xs, start)
            targets_window = targets
        else:
            (xs_before, xs_window), (_, targets_window) = _split(xs, start), _split(targets, start)
        if start:
            if size:
                state, trace = _advance_blocks(step, params, state, trace, xs_before, size)
            else:
                _, state, trace = eqtrace.run_online(step, params, state, trace, xs_before)
        loss, grads, _, _ = eqtrace.online_gradient(
            step,
            task.loss_fn,
            params,
            state,
            trace,
            xs_window,
            targets_window,
            block_size=size or None,
            reduction=reduction,
            step_weights=step_weights,
            sequence_targets=sequence_targets,
        )
        return loss, grads

    return gradient


def memory_per_sample(task: Task, algorithm, model) -> tuple[int, int, str]:
    """`(floats, bytes, kind)` kept per sample for the gradient: the trace of an online rule,
    or for BPTT the states of all `T` steps (a lower bound of what autodiff stores)."""
    if algorithm is None:
        leaves = jtu.tree_leaves(model.init_state())
        floats = task.length * sum(leaf.size for leaf in leaves)
        nbytes = task.length * sum(leaf.nbytes for leaf in leaves)
        return floats, nbytes, "stored states (T × |state|, lower bound)"
    if isinstance(algorithm, DNI):  # the window's states; the predictor is shared by the batch
        leaves = jtu.tree_leaves(model.init_state())
        floats = algorithm.window * sum(leaf.size for leaf in leaves)
        nbytes = algorithm.window * sum(leaf.nbytes for leaf in leaves)
        return floats, nbytes, "the window's states (lower bound) + a shared n² + n predictor"
    floats, nbytes = eqtrace.trace_size(algorithm, model)
    if isinstance(algorithm, eqtrace.ExactWindows):  # and the window's states, for its BPTT
        size = int(task.config.get("block", 0))
        leaves = jtu.tree_leaves(model.init_state())
        floats += size * sum(leaf.size for leaf in leaves)
        nbytes += size * sum(leaf.nbytes for leaf in leaves)
        return int(floats), int(nbytes), "trace + the window's states (lower bound)"
    return int(floats), int(nbytes), "trace"


def make_evaluate(task: Task, static) -> Callable:
    """`evaluate(params, xs, targets) -> (accuracy, rate in Hz or nan)` on a set of sequences,
    by `eqtrace.tasks.evaluate`: the class of the read-out summed over the decision window (for
    MNIST-1D, the last step) against the label, and the spiking layer's mean rate."""

    @eqx.filter_jit
    def evaluate(params, xs, targets):
        model = eqx.combine(params, static)
        if task.spiking:
            labels, mask = targets
        else:  # one label per sequence, answered at the last step
            labels = jnp.broadcast_to(targets, xs.shape[:2])
            mask = jnp.zeros(xs.shape[:2], bool).at[-1].set(True)
        result = eqtrace.tasks.evaluate(model, eqtrace.tasks.Batch(xs, labels, mask))
        rate = result.rates[0] if task.spiking else jnp.nan
        return result.accuracy, rate

    return evaluate


# ----------------------------------------------------------------------------------------------
# Training one (task, rule, seed)


def _gradient_check(task: Task, rule: str, algorithm, model) -> Callable:
    """`check(params) -> (cosine, norm ratio)`: `eqtrace.compare_gradients` of the rule's
    gradient against `eqtrace.bptt_gradient` of the same loss, on one held-out batch."""
    xs, targets = task.held_out_batch()
    batch = int(xs.shape[1])
    if "reference" not in task.cache:
        task.cache["reference"] = eqx.filter_jit(make_gradient(task, "bptt", None, model, batch))
    reference = task.cache["reference"]
    online = (
        None
        if algorithm is None
        else eqx.filter_jit(make_gradient(task, rule, algorithm, model, batch))
    )

    def check(params):
        if online is None:
            return 1.0, 1.0
        model_params = params[0] if isinstance(algorithm, DNI) else params
        _, bptt_grads = reference(model_params, xs, targets)
        _, grads = online(params, xs, targets)
        if isinstance(algorithm, DNI):
            grads = grads[0]
        comparison = eqtrace.compare_gradients(grads, bptt_grads)
        return float(comparison.overall_cosine), float(comparison.overall_norm_ratio)

    return check


def train(task: Task, rule_spec: str, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    config = task.config
    rule, decay, label = parse_rule(rule_spec, config)
    algorithm = make_algorithm(rule, decay)
    model = task.make_model(jr.key(seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    steps = config["steps"]
    schedule = optax.cosine_decay_schedule(config["lr"], steps, alpha=0.05)
    adam = (
        optax.adamw(schedule, weight_decay=config["weight_decay"])
        if config["weight_decay"]
        else optax.adam(schedule)
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), adam)
    dni = isinstance(algorithm, DNI)
    if dni:  # the model as every rule, its predictor (starting at zero) with its own Adam
        params = (params, eqtrace.SyntheticGradient(model))
        optimizer = optax.multi_transform(
            {"model": optimizer, "predictor": optax.adam(algorithm.lr)},
            ("model", "predictor"),
        )
    opt_state = optimizer.init(params)
    gradient = make_gradient(task, rule, algorithm, model, config["batch"])

    def model_params(params):
        return params[0] if dni else params

    noise_key = jr.key(seed + 2)

    @eqx.filter_jit
    def update(params, opt_state, xs, targets, index):
        key = (
            None if algorithm is None else jr.fold_in(noise_key, index)
        )  # index: an array, so one compile
        loss, grads = gradient(params, xs, targets, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if "evaluate" not in task.cache:
        task.cache["evaluate"] = make_evaluate(task, static)
    evaluate = task.cache["evaluate"]
    gradient_check = _gradient_check(task, rule, algorithm, model)
    cosine_init, ratio_init = gradient_check(params)
    test_xs, test_targets = task.test_data()
    data_key = jr.key(seed + 1)
    # `loss[i]`: the training loss of update `i + 1`; test accuracy at the updates `eval_update`.
    curve: dict[str, list] = {"loss": [], "eval_update": [], "test_accuracy": []}
    times: list[float] = []
    compile_seconds = math.nan
    start = time.perf_counter()
    for i in range(1, steps + 1):
        xs, targets = task.train_batch(data_key, i - 1)
        jax.block_until_ready((xs, targets))
        t0 = time.perf_counter()
        params, opt_state, loss = update(params, opt_state, xs, targets, jnp.asarray(i))
        loss = float(loss)  # waits for the update
        elapsed = time.perf_counter() - t0
        if i == 1:
            compile_seconds = elapsed
        else:
            times.append(elapsed)
        curve["loss"].append(loss)
        if i % config["eval_every"] == 0 or i == steps:
            accuracy, rate = evaluate(model_params(params), test_xs, test_targets)
            curve["eval_update"].append(i)
            curve["test_accuracy"].append(float(accuracy))
            log(
                f"  {task.name} {label} seed {seed}: update {i}/{steps}, loss {loss:.3g}, "
                f"test {float(accuracy):.1%}" + (f", {float(rate):.0f} Hz" if task.spiking else "")
            )
    train_seconds = time.perf_counter() - start
    accuracy, rate = evaluate(model_params(params), test_xs, test_targets)

    cosine, ratio = gradient_check(params)
    floats, nbytes, memory_kind = memory_per_sample(task, algorithm, model)
    return {
        "task": task.name,
        "rule": rule,
        "rule_spec": rule_spec,
        "label": label,
        "decay": decay,
        "model": task.model_name,
        "seed": seed,
        "length": task.length,
        "test_accuracy": float(accuracy),
        "best_test_accuracy": max(curve["test_accuracy"], default=float(accuracy)),
        "rate_hz": float(rate) if task.spiking else None,
        "memory_floats": floats,
        "memory_bytes": nbytes,
        "memory_kind": memory_kind,
        "ms_per_update": 1e3 * statistics.median(times) if times else 1e3 * compile_seconds,
        "first_update_seconds": compile_seconds,
        "train_seconds": train_seconds,
        "gradient_cosine": cosine,
        "gradient_norm_ratio": ratio,
        "gradient_cosine_init": cosine_init,
        "gradient_norm_ratio_init": ratio_init,
        "config": config,
        "curve": curve,
    }


# ----------------------------------------------------------------------------------------------
# The record


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    device = jax.devices()[0]
    status = _git("status", "--porcelain", "--", "src", "benchmarks")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax_device": f"{device.platform} ({device.device_kind})",
            "load_average_at_start": [round(x, 2) for x in load],
        },
        "versions": {
            "python": platform.python_version(),
            **{
                name: _version(name)
                for name in ("eqtrace", "jax", "jaxlib", "equinox", "optax", "numpy", "mnist1d")
            },
        },
        "git": {
            "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(status) if status is not None else None,
        },
    }


def resolve_configs(
    tasks: Sequence[str], fast: bool, overrides: Sequence[str]
) -> dict[str, dict[str, Any]]:
    configs = {}
    for name in tasks:
        if name not in DEFAULTS:
            raise SystemExit(f"unknown task {name!r}; choose from {', '.join(DEFAULTS)}")
        configs[name] = {**DEFAULTS[name], **(FAST[name] if fast else {})}
    for item in overrides:
        key, eq, value = item.partition("=")
        task, dot, field = key.partition(".")
        if not (eq and dot) or task not in DEFAULTS or field not in DEFAULTS[task]:
            raise SystemExit(
                f"--set {item!r}: expected task.key=value with a key of {sorted(DEFAULTS)} "
                f"(e.g. dms.delay=500)"
            )
        if task not in configs:
            continue
        default = DEFAULTS[task][field]
        configs[task][field] = type(default)(value) if not isinstance(default, str) else value
    return configs


def write_record(record: dict[str, Any], path: Path) -> None:
    """Writes the JSON record, the learning curves' losses to 4 significant digits and every
    list of numbers on one line (a few tens of KiB instead of a number per line)."""
    for r in record["runs"]:
        r["curve"].pop("update", None)  # 1, 2, …: the position in `loss`
        r["curve"]["loss"] = [float(f"{x:.4g}") for x in r["curve"]["loss"]]
    text = json.dumps(record, indent=1, ensure_ascii=False)
    text = re.sub(
        r"\[\s*([-+0-9.eE,\sNaInfity]*?)\s*\]",
        lambda m: "[" + " ".join(m.group(1).split()) + "]",
        text,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def run(args) -> dict[str, Any]:
    configs = resolve_configs(args.tasks, args.fast, args.set)
    overrides: dict[str, dict[str, Any]] = {}
    for item in args.set:
        key, _, _ = item.partition("=")
        task, _, field = key.partition(".")
        if task in configs:
            overrides.setdefault(task, {})[field] = configs[task][field]
    record = {
        "command": "python -m benchmarks.tasks " + shlex.join(args.argv),
        **environment(),
        "fast": args.fast,
        "seeds": args.seeds,
        "rules": args.rules,
        "configs": configs,
        "runs": [],
    }
    out = Path(args.out) if args.out else None
    start = time.perf_counter()

    def log(text):
        print(text, file=sys.stderr, flush=True)

    def save():
        if out is not None:
            write_record(record, out)

    for name, config in configs.items():
        rules = args.rules
        for seed in args.seeds:
            task = make_task(name, config, seed)
            for spec in rules:
                log(f"{name} / {spec} / seed {seed}: T = {task.length}, {config['steps']} updates")
                result = train(task, spec, seed, log)
                result["overrides"] = overrides.get(name, {})
                log(
                    f"  -> test {result['test_accuracy']:.1%}, cosine to BPTT "
                    f"{result['gradient_cosine_init']:.3f} at init, "
                    f"{result['gradient_cosine']:.3f} at the end, "
                    f"{result['ms_per_update']:.0f} ms/update, "
                    f"{result['train_seconds']:.0f} s"
                )
                record["runs"].append(result)
                record["total_seconds"] = time.perf_counter() - start
                save()
    record["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    record["total_seconds"] = time.perf_counter() - start
    save()
    print(results_markdown([record]))
    return record


# ----------------------------------------------------------------------------------------------
# Tables and plots from the JSON


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _group(runs: Sequence[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["task"], r["label"], r["model"], json.dumps(r["config"], sort_keys=True))
        groups.setdefault(key, []).append(r)
    return groups


def _variant(run: dict) -> str:
    """The settings of a run that differ from its task's defaults (besides the hidden size,
    which the model names, and the evaluation interval), e.g. `block=13`."""
    skip = {"hidden", "eval_every", "ppprop_decay"}
    if "overrides" in run:  # the `--set` of the command
        changed = run["overrides"]
    else:
        defaults = DEFAULTS.get(run["task"], {})
        changed = {k: v for k, v in run["config"].items() if defaults.get(k) != v}
    return ", ".join(f"{k}={v}" for k, v in changed.items() if k not in skip)


def _spread(values: Sequence[float], spec: str, scale: float = 1.0) -> str:
    values = [scale * v for v in values]
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, spec)
    return f"{format(mean, spec)} ({'/'.join(format(v, spec) for v in values)})"


def results_markdown(records: Sequence[dict]) -> str:
    """One markdown table per task (rows: rule and model), seeds averaged (each in brackets)."""
    runs = [r for record in records for r in record["runs"]]
    sections = []
    for task in dict.fromkeys(r["task"] for r in runs):
        rows = []
        for (_, label, model, _), group in _group([r for r in runs if r["task"] == task]).items():
            first = group[0]
            memory = f"{first['memory_floats']:,} / {_bytes(first['memory_bytes'])}"
            if first["rule"] == "bptt":
                memory += " *"
            variant = _variant(first)
            rows.append(
                [
                    f"{label} ({variant})" if variant else label,
                    model,
                    _spread([r["test_accuracy"] for r in group], ".1f", 100),
                    _spread([r["best_test_accuracy"] for r in group], ".1f", 100),
                    memory,
                    _spread([r["ms_per_update"] for r in group], ".0f"),
                    "—"
                    if first["rule"] == "bptt"
                    else _spread([r["gradient_cosine_init"] for r in group], ".2f"),
                    "—"
                    if first["rule"] == "bptt"
                    else _spread([r["gradient_cosine"] for r in group], ".2f"),
                    "—"
                    if first["rate_hz"] is None
                    else _spread([r["rate_hz"] for r in group], ".0f"),
                ]
            )
        config = runs[[r["task"] for r in runs].index(task)]["config"]
        length = runs[[r["task"] for r in runs].index(task)]["length"]
        header = [
            "rule",
            "model",
            "test acc %",
            "best %",
            "memory / sample (floats / bytes)",
            "ms / update",
            "cos to BPTT, init",
            "cos to BPTT, end",
            "rate Hz",
        ]
        sections.append(
            f"### {TASK_TITLES.get(task, task)} (T = {length}, {config['steps']} updates of "
            f"batch {config['batch']})\n\n" + _markdown_table(header, rows)
        )
    return "\n\n".join(sections)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_small(fig, path: Path) -> None:
    """Saves `fig` as a small PNG: 80 dpi, reduced to a 64-colour palette (Pillow, which
    matplotlib depends on), so that the docs site ships tens of KiB per figure."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def plot(records: Sequence[dict], directory: Path, prefix: str) -> list[Path]:
    """`<prefix>_memory.png` (test accuracy against memory per sample, one panel per task) and
    `<prefix>_curves.png` (training loss and test accuracy over the updates, one row per task)."""
    plt = _pyplot()
    runs = [r for record in records for r in record["runs"]]
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        groups = _group([r for r in runs if r["task"] == task])
        seen: dict[str, int] = {}
        for (_, label, model, _), group in groups.items():
            rule = group[0]["rule"]
            variant = seen[rule] = seen.get(rule, -1) + 1  # 0 for the first group of a rule
            accs = [100 * r["test_accuracy"] for r in group]
            memory = group[0]["memory_bytes"]
            style = {
                "color": RULES[rule].color,
                "marker": RULES[rule].marker if variant == 0 else "D",
                # Hollow: BPTT (its memory is a lower bound) and a rule's later variants.
                "facecolors": "none" if rule == "bptt" or variant else RULES[rule].color,
            }
            ax.scatter(
                [memory] * len(accs), accs, alpha=0.4 if len(accs) > 1 else 1.0, s=18, **style
            )
            ax.scatter([memory], [statistics.fmean(accs)], s=60, label=label, **style)
        chance = 10 if task == "mnist1d" else 50
        ax.axhline(chance, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set(title=TASK_TITLES.get(task, task), xlabel="memory per sample (bytes)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    path = directory / f"{prefix}_memory.png"
    _save_small(fig, path)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(len(tasks), 2, figsize=(8.0, 2.4 * len(tasks)), squeeze=False)
    for (ax_loss, ax_acc), task in zip(axes, tasks):
        groups = _group([r for r in runs if r["task"] == task])
        for (_, label, _, _), group in groups.items():
            for j, r in enumerate(group):
                rule = r["rule"]
                losses = np.asarray(r["curve"]["loss"])
                k = max(1, len(losses) // 50)  # a running mean, for readability
                smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
                updates = np.arange(1, len(losses) + 1)[k - 1 :]
                kwargs = {"color": RULES[rule].color, "alpha": 0.85, "lw": 1.0}
                if label.startswith("pp-prop") and any(
                    g[0]["rule"] == "ppprop" and g[0]["label"] != label for g in groups.values()
                ):
                    kwargs["ls"] = ":" if r.get("decay", 0) and r["decay"] > 0.99 else "-"
                name = label if j == 0 else None
                ax_loss.plot(updates, smooth, label=name, **kwargs)
                ax_acc.plot(
                    r["curve"]["eval_update"],
                    [100 * a for a in r["curve"]["test_accuracy"]],
                    label=name,
                    **kwargs,
                )
        if task == "mnist1d":
            ax_loss.set_yscale("log")
        ax_loss.set(ylabel="training loss", title=TASK_TITLES.get(task, task))
        ax_acc.set(ylabel="test accuracy (%)", ylim=(0, 100), title=TASK_TITLES.get(task, task))
        ax_acc.axhline(10 if task == "mnist1d" else 50, color="grey", ls="--", lw=0.8)
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=7, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("update")
    fig.tight_layout()
    path = directory / f"{prefix}_curves.png"
    _save_small(fig, path)
    plt.close(fig)
    paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="the JSON file to write (rewritten after every run)")
    parser.add_argument(
        "--tasks", default=",".join(DEFAULTS), help=f"subset of {','.join(DEFAULTS)}"
    )
    parser.add_argument(
        "--rules",
        default=None,
        help=f"of {', '.join(RULES)}, ppprop@DECAY (ppprop alone: the task's decay) "
        f"(default {','.join(DEFAULT_RULES)}; with --fast, drtrl,ppprop,bptt)",
    )
    parser.add_argument(
        "--seeds", default=None, help="comma-separated seeds (default 0,1; with --fast, 0)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="TASK.KEY=VALUE", help="override a setting"
    )
    parser.add_argument(
        "--fast", action="store_true", help="tiny sizes and 2 updates per run: a smoke run"
    )
    parser.add_argument(
        "--plot",
        nargs="*",
        metavar="JSON",
        help="plot from these JSON files (or from --out after running) to --plot-dir, and print "
        "the markdown tables",
    )
    parser.add_argument("--plot-dir", default=str(ROOT / "docs" / "results"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.rules is None:  # the smoke run skips the second pp-prop decay (the same code)
        args.rules = "drtrl,ppprop,bptt" if args.fast else ",".join(DEFAULT_RULES)
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    seeds = args.seeds if args.seeds is not None else ("0" if args.fast else "0,1")
    args.seeds = [int(s) for s in seeds.split(",")]
    if args.plot is None and not args.out and not args.fast:
        parser.error("give --out FILE to run (or --fast for a smoke run), or --plot JSON ...")
    return args


def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    records = []
    if not (args.plot and not args.out):  # run unless only plotting
        if args.out or args.fast:
            records.append(run(args))
    if args.plot is not None:
        files = [Path(p) for p in args.plot] or ([Path(args.out)] if args.out else [])
        loaded = [json.loads(p.read_text()) for p in files]
        for p, record in zip(files, loaded):
            for path in plot([record], Path(args.plot_dir), p.stem):
                print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)
        print(results_markdown(loaded))
    return records


if __name__ == "__main__":
    main()
