from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np

import eqtrace


def tree_allclose(x: Any, y: Any, *, rtol: float = 1e-9, atol: float = 0.0) -> bool:
    """Whether two pytrees have the same structure and all leaves are close."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    # NumPy rather than jax.numpy: eager JAX ops compile once per shape, which adds up.
    return all(
        a.shape == b.shape and bool(np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol))
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    )


def relative_error(x: Any, y: Any) -> float:
    """Largest leaf-wise `max|x - y| / max|y|` (zero leaves of `y` compare absolutely)."""
    errors = [
        float(np.max(np.abs(np.asarray(a) - b)) / np.maximum(np.max(np.abs(b)), 1e-300))
        if b.size
        else 0.0
        for a, b in ((a, np.asarray(b)) for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y)))
    ]
    return max(errors)


def squared_loss(y, target):
    return jnp.sum((y - target) ** 2)


def random_sequence(key, model, length: int, input_size: int, output_shape: tuple[int, ...]):
    xkey, tkey = jr.split(key)
    xs = jr.normal(xkey, (length, input_size))
    targets = jr.normal(tkey, (length, *output_shape))
    return xs, targets


def online_and_bptt(algorithm, model, xs, targets, loss_fn=squared_loss, state=None):
    """Summed per-step online gradients (through the trace path) and the BPTT gradient."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    if state is None:
        state = model.init_state()
    trace = algorithm.init_trace(model, state, xs[0])
    online_step = eqtrace.make_online_step(algorithm, static)
    _, online, _, _ = eqtrace.online_gradient(
        online_step, loss_fn, params, state, trace, xs, targets
    )
    _, bptt, _ = eqtrace.bptt_gradient(
        eqtrace.make_forward_step(static), loss_fn, params, state, xs, targets
    )
    return online, bptt


def output_shape(model, x) -> tuple[int, ...]:
    state = model.init_state()
    _, y = jax.eval_shape(model, state, x)
    return y.shape
