"""Synthetic gradients (`eqtrace.synthetic_gradient`) against plain windows and BPTT.

    python -m benchmarks.synthetic_gradients cost [k]  # time, memory, cosine on a GRU (k = 20)
    python -m benchmarks.synthetic_gradients copy   # accuracy on the copy task

`cost`: GRU 8 → 32 with a linear read-out, batch 16, T = 200, windows of 20, float32, a loss
at every step on targets that echo the input 10 steps back (so that half of a window's steps
owe credit to the window before). Time per gradient over the sequence (compiled, interleaved
rounds, median) and XLA's temporary memory of the compiled call, for synthetic gradients,
truncated BPTT in the same windows (`truncated_bptt_gradient`, the zero predictor),
`ExactWindows(DRTRL())` in the same windows and BPTT. The cosine to BPTT is measured with the
predictor fitted first (parameters held) on 200 batches of the same distribution, on a fresh
batch.

`copy`: the copy task (`eqtrace.tasks.copy_task`, 3 symbols out of 4, delay 8: T = 15), GRU 6
→ 32 with a linear read-out, windows of 4 (shorter than the delay), Adam 3e-3, batches of 32,
one update per window; accuracy on the recalled symbols of a test batch of 512, for
synthetic gradients, truncated BPTT in the same windows, `ExactWindows(DRTRL())` in the same
windows, and BPTT over the whole sequence (one update per sequence).
"""

import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import eqtrace
from eqtrace import nn

from .timing import time_interleaved


ECHO = 10


def _gru(input_size, hidden, output, key, dtype=jnp.float32):
    k1, k2 = jr.split(key)
    return nn.Sequential(
        [
            nn.GRUCell(input_size, hidden, dtype=dtype, key=k1),
            eqx.nn.Linear(hidden, output, dtype=dtype, key=k2),
        ]
    )


def _cosine(a, b):
    a, b = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)]) for t in (a, b))
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def cost(batch=16, length=200, window=20, hidden=32, fit_batches=200):
    model = _gru(8, hidden, 4, jr.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))

    def data(key):  # the targets echo the first 4 input channels `ECHO` steps back
        xs = jr.normal(key, (length + ECHO, batch, 8))
        return xs[ECHO:], xs[:-ECHO, :, :4]

    def loss_fn(y, target):
        return jnp.mean((y - target) ** 2)

    state = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), model.init_state())
    rule = eqtrace.ExactWindows(eqtrace.DRTRL())
    block = jax.vmap(
        eqtrace.make_online_block(rule, static), in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1)
    )
    _, trace = eqtrace.init_state_and_trace(model, rule, batch)

    # Fit the predictor with the parameters held.
    predictor = eqtrace.SyntheticGradient(model)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(predictor)

    @eqx.filter_jit
    def fit(predictor, opt_state, key):
        xs, targets = data(key)
        *_, fit_loss, grads, _ = eqtrace.synthetic_gradient(
            forward, loss_fn, params, predictor, state, xs, targets, window
        )
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(predictor, updates), opt_state, fit_loss

    fit_losses = []
    for i in range(fit_batches):
        predictor, opt_state, fit_loss = fit(predictor, opt_state, jr.key(100 + i))
        fit_losses.append(float(fit_loss))
    print(
        f"fitting loss (mean per fitted window), first 10 batches {np.mean(fit_losses[:10]):.3g}, "
        f"last 10 {np.mean(fit_losses[-10:]):.3g}"
    )

    xs, targets = data(jr.key(1))
    jobs = {
        "synthetic": lambda: (
            lambda p, g, s, x, t: eqtrace.synthetic_gradient(
                forward, loss_fn, p, g, s, x, t, window
            )[1],
            (params, predictor, state, xs, targets),
        ),
        "truncated": lambda: (
            lambda p, s, x, t: eqtrace.truncated_bptt_gradient(
                forward, loss_fn, p, s, x, t, window
            )[1],
            (params, state, xs, targets),
        ),
        "drtrl-window": lambda: (
            lambda p, s, tr, x, t: eqtrace.online_gradient(
                block, loss_fn, p, s, tr, x, t, block_size=window
            )[1],
            (params, state, trace, xs, targets),
        ),
        "bptt": lambda: (
            lambda p, s, x, t: eqtrace.bptt_gradient(forward, loss_fn, p, s, x, t)[1],
            (params, state, xs, targets),
        ),
    }
    results = time_interleaved(jobs, repeats=30, warmup=3)
    bptt = results["bptt"]["output"]
    base = statistics.median(results["bptt"]["times_s"])
    plain = statistics.median(results["truncated"]["times_s"])
    print(f"GRU 8 → {hidden} + Linear, batch {batch}, T = {length}, windows of {window}, float32")
    print("| method | ms per gradient | × truncated BPTT | × BPTT | XLA temp MB | cosine to BPTT |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, result in results.items():
        t = statistics.median(result["times_s"])
        print(
            f"| {name} | {1e3 * t:.1f} | {t / plain:.2f} | {t / base:.2f} | "
            f"{result['xla_temp_mb']:.2f} | {_cosine(result['output'], bptt):.4f} |"
        )


def copy(updates_per_method=None, batches=400, window=4, hidden=32, seed=0):
    del updates_per_method
    n_symbols, length, delay, batch = 4, 3, 8, 32
    task = dict(length=length, delay=delay, n_symbols=n_symbols)
    model = _gru(n_symbols + 2, hidden, n_symbols + 1, jr.key(seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward = jax.vmap(eqtrace.make_forward_step(static), in_axes=(None, 0, 0))

    def loss_fn(y, target):
        labels, mask = target
        losses = optax.softmax_cross_entropy_with_integer_labels(y, labels)
        return jnp.sum(mask * losses) / mask.shape[0]

    def accuracy(params):
        inputs, labels, mask = eqtrace.tasks.copy_task(jr.key(10**6), 512, **task)
        state = jax.tree.map(lambda a: jnp.broadcast_to(a, (512, *a.shape)), model.init_state())

        def body(state, x):
            return forward(params, state, x)

        _, ys = jax.lax.scan(body, state, inputs)
        correct = (jnp.argmax(ys, -1) == labels) & mask
        return float(jnp.sum(correct) / jnp.sum(mask))

    def batch_of(i):
        inputs, labels, mask = eqtrace.tasks.copy_task(jr.key(seed * 10**5 + i), batch, **task)
        return inputs, (labels, mask)

    state = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), model.init_state())
    optimizer = optax.adam(3e-3)
    out = {}

    def run_synthetic(frozen_predictor):
        predictor = eqtrace.SyntheticGradient(model)
        labels = (
            jax.tree.map(lambda _: "model", params),
            jax.tree.map(lambda _: "frozen" if frozen_predictor else "model", predictor),
        )
        opt = optax.multi_transform({"model": optimizer, "frozen": optax.set_to_zero()}, labels)
        p, g, s = params, predictor, opt.init((params, predictor))

        @eqx.filter_jit
        def train(p, g, s, xs, targets):
            p, g, s, _, losses, fits = eqtrace.train_synthetic(
                forward, loss_fn, opt, p, g, s, state, xs, targets, window
            )
            return p, g, s, jnp.sum(losses) / losses.shape[0], jnp.sum(fits) / (fits.shape[0] - 1)

        fits = []
        for i in range(batches):
            p, g, s, _, fit = train(p, g, s, *batch_of(i))
            fits.append(float(fit))
        return p, fits

    start = time.perf_counter()
    p, fits = run_synthetic(False)
    out["synthetic"] = (accuracy(p), time.perf_counter() - start)
    print(
        f"fitting loss per window, first 20 batches {np.mean(fits[:20]):.3g}, last 20 "
        f"{np.mean(fits[-20:]):.3g}"
    )
    start = time.perf_counter()
    p, _ = run_synthetic(True)
    out["truncated"] = (accuracy(p), time.perf_counter() - start)

    rule = eqtrace.ExactWindows(eqtrace.DRTRL())
    block = jax.vmap(
        eqtrace.make_online_block(rule, static), in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1)
    )
    start = time.perf_counter()
    p, s = params, optimizer.init(params)
    for i in range(batches):
        st, trace = eqtrace.init_state_and_trace(model, rule, batch)
        xs, targets = batch_of(i)
        p, s, *_ = eqtrace.train_online(
            block, loss_fn, optimizer, p, s, st, trace, xs, targets, block_size=window
        )
    out["drtrl-window"] = (accuracy(p), time.perf_counter() - start)

    @eqx.filter_jit
    def bptt_update(p, s, xs, targets):
        _, grads, _ = eqtrace.bptt_gradient(forward, loss_fn, p, state, xs, targets)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    start = time.perf_counter()
    p, s = params, optimizer.init(params)
    for i in range(batches):
        p, s = bptt_update(p, s, *batch_of(i))
    out["bptt"] = (accuracy(p), time.perf_counter() - start)
    print(
        f"copy task ({length} of {n_symbols} symbols, delay {delay}, T = {2 * length + delay + 1}),"
        f" GRU {hidden}, windows of {window}, {batches} batches of {batch}, seed {seed}"
    )
    print("| method | recall accuracy | seconds |")
    print("| --- | --- | --- |")
    for name, (acc, seconds) in out.items():
        print(f"| {name} | {acc:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "cost"
    if command == "cost":  # `cost [window]`
        cost(window=int(sys.argv[2]) if len(sys.argv) > 2 else 20)
    else:
        copy()
