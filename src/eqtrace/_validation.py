"""Trace-time checks of the arguments of a step: state, trace and input must fit the model."""

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu


def _describe(tree: Any) -> str:
    def leaf(x):
        return f"{jnp.dtype(x.dtype).name}{list(x.shape)}" if hasattr(x, "shape") else repr(x)

    return str(jtu.tree_map(leaf, tree, is_leaf=lambda x: x is None))


def _same_layout(expected: Any, received: Any) -> bool:
    exp_leaves, exp_def = jtu.tree_flatten(expected)
    rec_leaves, rec_def = jtu.tree_flatten(received)
    if exp_def != rec_def:
        return False
    return all(
        jnp.shape(e) == jnp.shape(r) and jnp.result_type(e) == jnp.result_type(r)
        for e, r in zip(exp_leaves, rec_leaves)
    )


def check_matches(name: str, expected: Any, received: Any, fix: str) -> None:
    """Raises if `received` does not have the structure, shapes and dtypes of `expected`."""
    if not _same_layout(expected, received):
        raise ValueError(
            f"`{name}` does not fit the model: expected a pytree laid out as "
            f"{_describe(expected)}, but received {_describe(received)}. {fix}"
        )


def check_state(model: Any, state: Any) -> None:
    expected = jax.eval_shape(model.init_state)
    check_matches(
        "state",
        expected,
        state,
        "Create it with `model.init_state()` (for a batch, `jax.vmap` the step so that each "
        "sample sees a state without the batch axis).",
    )


def input_size(model: Any) -> int | None:
    """The length of the input vector `model` expects, where the model declares it."""
    from .nn._sequential import Sequential

    if isinstance(model, Sequential):
        return input_size(model.layers[0])
    for attr in ("input_size", "in_features"):
        size = getattr(model, attr, None)
        if isinstance(size, int):
            return size
    return None


def check_input(model: Any, x: Any) -> None:
    size = input_size(model)
    if size is not None and jnp.shape(x) != (size,):
        raise ValueError(
            f"`x` must be the input of one sample with shape ({size},) for "
            f"{type(model).__name__}, but received shape {jnp.shape(x)}. For a batch, "
            "`jax.vmap` the step over the batch axis; for a sequence, `jax.lax.scan` it over time."
        )


def example_input(model: Any) -> jax.Array | None:
    """A stand-in for one step's input, from the size the model declares (`None` if it does not).

    Zeros rather than a `jax.ShapeDtypeStruct`, because it is passed to `init_cell_trace`,
    whose `x: Input` annotation (checked by jaxtyping/beartype) admits arrays only.
    """
    size = input_size(model)
    return None if size is None else jnp.zeros((size,), jnp.result_type(float))


def require_example_input(model: Any, x: Any) -> None:
    if x is None:
        raise ValueError(
            f"{type(model).__name__} does not declare an `input_size`, so the shape of its input "
            "is unknown: pass an example input of one step, `algorithm.init_trace(model, state, "
            "x)` or `eqtrace.init_state_and_trace(model, algorithm, x=x)`."
        )
