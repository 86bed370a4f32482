"""Shared helpers of `demo.py` and `mnist1d_gru.py`: the MNIST-1D data, the GRU classifier, and
one training update per gradient method (D-RTRL, pp-prop, BPTT).

MNIST-1D (Greydanus & Kobak, 2020) is generated locally by the `mnist1d` package: 4 000 training
and 1 000 test sequences of 40 scalars each, 10 classes. The network reads one scalar per time
step and classifies the sequence from its output at the last step.
"""

import math
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax

import eqtrace


METHODS = ("drtrl", "ppprop", "bptt")
LABELS = {"drtrl": "D-RTRL", "ppprop": "pp-prop", "bptt": "BPTT"}
#: What each method is for, printed with the results (docs/algorithms/choosing.md says more).
PURPOSES = {
    "drtrl": "online, memory constant in T",
    "ppprop": "online, least memory; weak on this task (expected: docs, How to choose)",
    "bptt": "offline reference, memory grows with T",
}


def load_mnist1d(seed: int = 42, num_samples: int = 5000) -> dict[str, np.ndarray]:
    """MNIST-1D, generated on the spot (no download) by `eqtrace.tasks.mnist1d`: `x` of shape
    `(N, 40, 1)` standardised with the training set's mean and standard deviation, integer
    labels `y`. `num_samples` sequences in all, 80 % for training (the generation takes about
    3.5 s of CPU for the default 5 000; a `--fast` run takes a tenth)."""
    return eqtrace.tasks.mnist1d(seed, num_samples=num_samples)


def make_model(hidden: int, key, delay: int = 0) -> eqtrace.nn.Sequential:
    """A GRU of `hidden` units reading one scalar per step (or, with `delay`, a window of the
    last `delay` scalars from an `eqtrace.nn.DelayLine`), and a linear read-out to 10 classes."""
    gkey, rkey = jr.split(key)
    front = [eqtrace.nn.DelayLine(1, delay)] if delay else []
    return eqtrace.nn.Sequential(
        [
            *front,
            eqtrace.nn.GRUCell(max(delay, 1), hidden, key=gkey),
            eqx.nn.Linear(hidden, 10, key=rkey),
        ]
    )


def make_algorithm(method: str, rank: float = 100.0) -> eqtrace.AbstractAlgorithm | None:
    """The online rule of `method` (`None` for BPTT)."""
    if method == "drtrl":
        return eqtrace.DRTRL()
    if method == "ppprop":
        return eqtrace.PPProp(rank=rank)
    if method == "bptt":
        return None
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}.")


def cross_entropy(logits, labels):
    """Mean cross-entropy over the batch: `logits` `(B, 10)`, integer `labels` `(B,)`."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def memory_per_sample(method: str, model, length: int) -> tuple[int, int]:
    """`(floats, bytes)` that a method keeps per sample to compute its gradient.

    For an online rule: the size of its trace pytree (constant in the sequence length). For
    BPTT: the hidden states over the sequence, `length × |h|` (a lower bound: autodiff also
    keeps the gate activations of every step).
    """
    algorithm = make_algorithm(method)
    if algorithm is None:
        states = jtu.tree_leaves(model.init_state())
        floats = length * sum(s.size for s in states)
        return floats, floats * states[0].dtype.itemsize
    return eqtrace.trace_size(algorithm, model)


def make_update(method: str, model, optimizer, batch_size: int, rank: float = 100.0):
    """One jitted training update on a batch: `update(params, opt_state, xs, labels)` with `xs`
    time-major `(T, B, 1)`, returning `(params, opt_state, loss)`."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    algorithm = make_algorithm(method, rank)

    if algorithm is None:
        # BPTT: `jax.grad` through the whole unrolled sequence, loss at the last step.
        forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))

        def gradient(params, xs, labels):
            state = jtu.tree_map(
                lambda a: jnp.broadcast_to(a, (batch_size, *a.shape)), model.init_state()
            )

            def loss_fn(params):
                state_T, _ = jax.lax.scan(lambda s, x: (forward(params, s, x)[0], None), state, xs)
                logits = jax.vmap(eqx.combine(params, static).output)(state_T)
                return cross_entropy(logits, labels)

            return jax.value_and_grad(loss_fn)(params)

    else:
        # Online: the step is vmapped over the batch (parameters shared). The trace runs
        # forward over the first T - 1 steps without any gradient; the online gradient of the
        # loss at the last step is then the trace contracted with dL/dh_T, one step.
        step = jax.vmap(eqtrace.make_online_step(algorithm, static), in_axes=(None, 0, 0, 0))
        state0, trace0 = eqtrace.init_state_and_trace(model, algorithm, batch_size=batch_size)

        def gradient(params, xs, labels):
            _, state, trace = eqtrace.run_online(step, params, state0, trace0, xs[:-1])
            loss, grads, _, _ = eqtrace.online_gradient(
                step, cross_entropy, params, state, trace, xs[-1:], labels, sequence_targets=True
            )
            return loss, grads

    @eqx.filter_jit
    def update(params, opt_state, xs, labels):
        loss, grads = gradient(params, xs, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return params, static, update


@eqx.filter_jit
def _correct(params, static, xs, labels):
    """The number of sequences of a time-major batch `xs` whose output at the last step has its
    largest logit at the label. `static` is a static argument: the methods of a run share the
    model's architecture, hence one compilation per batch shape."""
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))
    model = eqx.combine(params, static)
    state = jax.vmap(lambda _: model.init_state())(labels)
    state, _ = jax.lax.scan(lambda s, x: (forward(params, s, x)[0], None), state, xs)
    logits = jax.vmap(model.output)(state)
    return jnp.sum(jnp.argmax(logits, axis=-1) == labels)


def make_evaluate(static, batch_size: int = 1000):
    """`accuracy(params, xs, labels)`: the fraction of sequences (`xs` of shape `(N, T, 1)`)
    whose output at the last step has its largest logit at the label."""

    def accuracy(params, xs, labels):
        total = 0
        for i in range(0, len(labels), batch_size):
            x = jnp.swapaxes(jnp.asarray(xs[i : i + batch_size]), 0, 1)  # time-major
            total += int(_correct(params, static, x, jnp.asarray(labels[i : i + batch_size])))
        return total / len(labels)

    return accuracy


def batches(data: dict[str, np.ndarray], batch_size: int, seed: int):
    """Endless shuffled mini-batches of the training set, time-major: `(T, B, 1)`, `(B,)`."""
    rng = np.random.default_rng(seed)
    n = len(data["y_train"])
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield np.swapaxes(data["x_train"][idx], 0, 1), data["y_train"][idx]


def train(
    method: str,
    data: dict[str, np.ndarray],
    *,
    hidden: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    rank: float = 100.0,
    eval_every: int = 0,
    progress: bool = True,
    delay: int = 0,
) -> dict[str, Any]:
    """Trains the GRU classifier with `method` and returns its test accuracy, the wall time of
    training (compilation included), and the learning curve."""
    from tqdm.auto import tqdm

    model = make_model(hidden, jr.key(seed), delay)
    schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    params, static, update = make_update(method, model, optimizer, batch_size, rank)
    opt_state = optimizer.init(params)
    # Batches of 1 000, or of the whole test set if smaller (a `--fast` run's): one batch shape
    # for the test and the training set, hence one compilation.
    accuracy = make_evaluate(static, min(1000, len(data["y_test"])))
    length = data["x_train"].shape[1]

    curve: dict[str, list] = {"step": [], "loss": [], "eval_step": [], "test_accuracy": []}
    data_iter = batches(data, batch_size, seed)
    start = time.perf_counter()
    running = math.nan
    desc = f"{LABELS[method]:>7}"
    bar = None

    def record(i, loss):
        nonlocal running
        loss = float(loss)
        running = loss if math.isnan(running) else 0.95 * running + 0.05 * loss
        curve["step"].append(i)
        curve["loss"].append(loss)
        if eval_every and (i % eval_every == 0 or i == steps):
            curve["eval_step"].append(i)
            curve["test_accuracy"].append(accuracy(params, data["x_test"], data["y_test"]))
            if bar is not None:
                bar.set_postfix(loss=f"{running:.3g}", test=f"{curve['test_accuracy'][-1]:.1%}")
        elif bar is not None and i % 10 == 0:
            # Three significant digits: BPTT's loss falls below 1e-3, where `.3f` shows 0.000.
            bar.set_postfix(loss=f"{running:.3g}")

    # The first update compiles the step: its own phase, so that the bar's rate and estimate
    # are those of training.
    if progress:
        print(f"{desc}: compiling the update…", end="", flush=True)
    xs, labels = next(data_iter)
    params, opt_state, loss = update(params, opt_state, xs, labels)
    record(1, loss)
    compile_seconds = time.perf_counter() - start
    if progress:
        print(f" {compile_seconds:.1f} s (with the first update)", flush=True)
    bar = tqdm(
        range(2, steps + 1), desc=desc, disable=not progress, ncols=90, initial=1, total=steps
    )
    for i in bar:
        xs, labels = next(data_iter)
        params, opt_state, loss = update(params, opt_state, xs, labels)
        record(i, loss)
    seconds = time.perf_counter() - start
    bar.close()
    floats, nbytes = memory_per_sample(method, model, length)
    return {
        "method": method,
        "test_accuracy": accuracy(params, data["x_test"], data["y_test"]),
        "train_accuracy": accuracy(params, data["x_train"], data["y_train"]),
        "seconds": seconds,
        "compile_seconds": compile_seconds,
        # After compilation: the time of the updates that followed the first.
        "seconds_per_update": (seconds - compile_seconds) / max(steps - 1, 1),
        "trace_floats": floats,
        "trace_bytes": nbytes,
        "curve": curve,
        "params": params,
    }


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def results_table(results: list[dict[str, Any]], length: int) -> str:
    """A plain-text table of the results, one row per method (within 100 columns), then what
    each method is for."""
    header = (
        f"{'method':<8} {'test acc':>8} {'train acc':>9} {'compile':>8} {'total':>8} "
        f"{'ms/update':>9} {'memory/sample':>24}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        memory = f"{r['trace_floats']:,} fl / {format_bytes(r['trace_bytes'])}"
        if r["method"] == "bptt":
            memory += "*"
        lines.append(
            f"{LABELS[r['method']]:<8} {r['test_accuracy']:>8.1%} {r['train_accuracy']:>9.1%} "
            f"{r['compile_seconds']:>7.1f}s {r['seconds']:>7.1f}s "
            f"{1e3 * r['seconds_per_update']:>9.1f} {memory:>24}"
        )
    lines.append("")
    lines += [f"{LABELS[r['method']]}: {PURPOSES[r['method']]}." for r in results]
    if any(r["method"] == "bptt" for r in results):
        lines.append(
            f"* BPTT keeps the hidden states of all T = {length} steps (a lower bound; it grows "
            "with T).\n  The online traces do not grow with T."
        )
    lines.append(
        "compile: the first update, compilation included; total: all updates; ms/update: the "
        "updates\nafter the first."
    )
    return "\n".join(lines)
