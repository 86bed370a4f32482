"""Trace-time checks of the arguments of a step: state, trace and input must fit the model."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend.core import Literal

from ._cell import AbstractCell
from ._sequential import Sequential


def _dtype_name(dtype: Any) -> str:
    """The name of a dtype, also of a PRNG key's (`key<fry>`), which `jnp.dtype` refuses."""
    return dtype.name if is_key_dtype(dtype) else jnp.dtype(dtype).name


def _describe(tree: Any) -> str:
    def leaf(x):
        return f"{_dtype_name(x.dtype)}{list(x.shape)}" if hasattr(x, "shape") else repr(x)

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


def is_key_dtype(dtype: Any) -> bool:
    """Whether `dtype` is that of a typed PRNG key (`jax.random.key`)."""
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def is_key(leaf: Any) -> bool:
    """Whether `leaf` is a typed PRNG key array (or its shape and dtype)."""
    return hasattr(leaf, "dtype") and is_key_dtype(leaf.dtype)


def check_key(owner: str, name: str, key: Any, example: str) -> None:
    """Raises unless `key` is one typed PRNG key (shape `()`, from `jax.random.key`)."""
    if key is None:
        raise ValueError(
            f"{owner} draws random numbers and needs a PRNG key, but `{name}` was not given. "
            f"Pass one, e.g. {example}."
        )
    if not is_key(key):
        received = (
            f"an array of dtype {_dtype_name(key.dtype)} and shape {list(key.shape)}"
            if hasattr(key, "dtype") and hasattr(key, "shape")
            else f"{key!r} ({type(key).__name__})"
        )
        raise TypeError(
            f"{owner}: `{name}` must be a typed PRNG key from `jax.random.key(seed)`, but "
            f"received {received}. Pass e.g. {example}; wrap a raw key from "
            "`jax.random.PRNGKey` with `jax.random.wrap_key_data(raw_key)`."
        )
    if key.shape != ():
        raise ValueError(
            f"{owner}: `{name}` must be a single PRNG key (shape ()), but received keys of "
            f"shape {list(key.shape)}. Pass one key, e.g. {example}: "
            "`eqtrace.init_state_and_trace(..., batch_size=B)` splits it into one key per "
            "sample."
        )


def check_model(owner: str, name: str, model: Any) -> None:
    """Refuses a model that is not an eqtrace cell or network (an `eqx.nn.Sequential`, a
    function), which would fail later on a missing `init_state` or inside its layers."""
    if isinstance(model, AbstractCell):
        return
    if isinstance(model, eqx.nn.Sequential):
        fix = (
            "Build the network with `eqtrace.nn.Sequential([...])` (the same layers): it "
            "threads each cell's state, which `eqx.nn.Sequential` cannot."
        )
    else:
        fix = (
            "Write the step as a subclass of `eqtrace.AbstractCell`, with `init_state()`, "
            "`__call__(state, x) -> (new_state, output(new_state))` and `output(state)`, "
            "or combine cells and layers in `eqtrace.nn.Sequential([...])`."
        )
    raise TypeError(
        f"{owner}: `{name}` must be an eqtrace cell (an instance of `eqtrace.AbstractCell`) or "
        f"an `eqtrace.nn.Sequential`, but received {type(model).__module__}."
        f"{type(model).__qualname__}. {fix}"
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


def check_step_keeps_state(model: Any, state: Any, x: Any, *, dtypes: bool = True) -> Any:
    """Raises if one step of `model` returns a state laid out otherwise than `state`: a step
    scanned over time must keep its state's shapes and dtypes (JAX would only say that the scan's
    carry changed type, or that a custom JVP's tangent has the wrong dtype). With `dtypes=False`
    (on an example input, when a trace is created), only the structure and shapes. Returns
    the shape of the step's output (the next layer's input)."""
    new_state, y = _shape_of_call(model, state, x)
    if jtu.tree_structure(new_state) != jtu.tree_structure(state):
        raise ValueError(
            f"{type(model).__name__}'s step returns a state laid out as {_describe(new_state)}, "
            f"but received the state {_describe(state)}: a step scanned over time must return "
            "its state with the same structure. Make `__call__` return the state in the layout "
            "`init_state` creates."
        )
    x_dtypes = [jnp.result_type(a) for a in jtu.tree_leaves(x) if eqx.is_inexact_array(a)]
    for (path, old), new in zip(jtu.tree_leaves_with_path(state), jtu.tree_leaves(new_state)):
        other_dtype = dtypes and jnp.result_type(old) != new.dtype
        if jnp.shape(old) != new.shape or other_dtype:
            # An input wider than the state (float32 data into a bfloat16 model) promotes it.
            wider_input = any(jnp.promote_types(d, old.dtype) != old.dtype for d in x_dtypes)
            cause = (
                f"the input `x` ({_describe(x)}) is not the input of one step of one sample "
                "that the model takes (e.g. an extra trailing axis, broadcast against the "
                "state), or `__call__` changes the state's shape: pass `x` of the shape the "
                "model's first layer takes, or keep the state's shape in `__call__`."
                if jnp.shape(old) != new.shape
                else f"the input `x` ({_describe(x)}) is wider than the state: cast the inputs to "
                "the model's dtype, or cast the new state in `__call__`."
                if wider_input
                else "`init_state` creates the state in another dtype than the parameters' "
                "(e.g. float32 state, float64 weights): create it in the parameters' dtype, "
                "e.g. `jnp.zeros(n, self.weight.dtype)`, or cast the new state in `__call__`."
            )
            raise ValueError(
                f"{type(model).__name__}'s step turns the state leaf `state{jtu.keystr(path)}` "
                f"from {_describe(old)} into {_describe(new)}: a step scanned over time must "
                f"keep its state's shapes and dtypes. This usually means {cause}"
            )
    return y


def check_example_input(model: Any, state: Any, x: Any) -> None:
    """Checks an example input of one step (given to create a trace, or to `eqtrace.check`)
    against the declared input size, and that each cell keeps its state's shapes on it, layer
    by layer: a wrong input would otherwise fail inside a later layer, or inside the analysis
    of the diagonal rules."""
    check_input(model, x)
    if not isinstance(model, Sequential):
        check_step_keeps_state(model, state, x, dtypes=False)
        return
    for layer, s in zip(model.layers, state):
        if isinstance(layer, AbstractCell):
            x = check_step_keeps_state(layer, s, x, dtypes=False)
        else:
            x = _shape_of_call(layer, x)


def _shape_of_call(layer: Any, *args: Any) -> Any:
    """`eqx.filter_eval_shape(layer, *args)`, with JAX's shape errors (an input of the wrong
    size meeting a matmul or a broadcast) turned into an error naming the input."""
    try:
        return eqx.filter_eval_shape(layer, *args)
    except (TypeError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "shape" not in first and "dimension" not in first:
            raise
        raise ValueError(
            f"{type(layer).__name__} cannot take the input `x` ({_describe(args[-1])}): "
            f"{type(error).__name__}: {first.rstrip('.')}. Pass `x` of the shape of one step "
            "of one sample that the model's first layer takes (its `input_size` features), and, "
            "in a `Sequential`, make each layer take the previous layer's output."
        ) from error


def check_parameters_enter_step(model: Any, state: Any, x: Any) -> None:
    """Raises if a parameter of `model` does not enter its step (neither `__call__` nor
    `output` reads it): every driver takes the state as given, so a parameter read only in
    `init_state` (a learned initial state), or nowhere, would get a zero gradient from every
    rule and from BPTT alike. Checked on the step's jaxpr, once per trace."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    paths = [jtu.keystr(path) for path, _ in jtu.tree_leaves_with_path(params)]
    if not paths:
        return
    jaxpr = jax.make_jaxpr(lambda p, s, u: eqx.combine(p, static)(s, u))(params, state, x).jaxpr
    read = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, Literal)}
    read |= {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    unread = [path for path, v in zip(paths, jaxpr.invars) if v not in read]
    if unread:
        raise ValueError(
            f"The parameter(s) {unread} of {type(model).__name__} do not enter its step (neither "
            "`__call__` nor `output` reads them), so they would get a zero gradient: the drivers "
            "take the state as given, so a parameter read only in `init_state` (a learned "
            "initial state) is not learned, by any rule or by BPTT. Hold such a value as a "
            "constant (a static field, or a Python float), or remove it."
        )


def check_size(owner: str, **sizes: Any) -> None:
    """Raises unless every size (of an input, a state, an output) is a positive `int`."""
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"{owner}: `{name}` must be a positive int (a number of features), but received "
                f"{size!r} ({type(size).__name__})."
            )


def check_count(function: str, name: str, value: Any) -> None:
    """Raises unless `value` is a Python `int >= 1` (a number of steps: a block, a window)."""
    if isinstance(value, jax.core.Tracer):
        # A NumPy or JAX integer is an array, which `jax.jit` traces: its value is unknown.
        raise TypeError(
            f"{function}: `{name}` must be a Python int (a number of steps), but received a "
            f"traced {value.dtype} array: a NumPy or JAX integer is an array, which `jax.jit` "
            f"traces, while the number of steps fixes the shapes. Pass `{name}=int(...)`."
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{function}: `{name}` must be a Python int (a number of steps), but received "
            f"{value!r} ({type(value).__name__}). Pass e.g. `{name}=16`."
        )
    if value < 1:
        raise ValueError(
            f"{function}: `{name}` must be >= 1 (a number of steps), but received {value}."
        )


def _dtype(leaf: Any) -> np.dtype | None:
    """The dtype of an array-like leaf (arrays, tracers, NumPy and Python numbers), else `None`."""
    if hasattr(leaf, "dtype"):
        return leaf.dtype
    if isinstance(leaf, bool | int | float | complex):
        return jnp.result_type(leaf)
    return None


def _is_real_number(dtype: np.dtype | None) -> bool:
    return dtype is not None and any(
        jnp.issubdtype(dtype, kind) for kind in (jnp.floating, jnp.integer, jnp.bool_)
    )


def input_size(model: Any) -> int | None:
    """The length of the input vector `model` expects, where the model declares it."""
    if isinstance(model, Sequential | eqx.nn.Sequential):
        return input_size(model.layers[0])
    # `in_features`: `eqx.nn.Linear`; `in_size`: `eqx.nn.MLP` ("scalar" for a scalar input).
    for attr in ("input_size", "in_features", "in_size"):
        size = getattr(model, attr, None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


def check_input(model: Any, x: Any) -> None:
    for path, leaf in jtu.tree_leaves_with_path(x):
        dtype = _dtype(leaf)
        if not _is_real_number(dtype):
            received = f"dtype {dtype.name}" if dtype is not None else type(leaf).__name__
            fix = (
                "split a complex signal into real features, e.g. "
                "`jnp.concatenate([x.real, x.imag])` for a model with twice the input size"
                if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating)
                else "convert it to an array, e.g. `jnp.asarray(x, jnp.float32)`"
            )
            raise TypeError(
                f"`x{jtu.keystr(path)}` must hold real numbers (floats, or ints and bools such as "
                f"tokens or spikes) for {type(model).__name__}, but received {received}; {fix}."
            )
    size = input_size(model)
    if size is not None and jnp.shape(x) != (size,):
        raise ValueError(
            f"`x` must be the input of one sample with shape ({size},) for "
            f"{type(model).__name__}, but received shape {jnp.shape(x)}. For a batch, "
            "`jax.vmap` the step over the batch axis; for a sequence, `jax.lax.scan` it over time."
        )


def floating_dtype(model: Any) -> np.dtype:
    """The real floating dtype of `model`'s first inexact array (JAX's default float if none)."""
    for leaf in jtu.tree_leaves(model):
        if eqx.is_inexact_array(leaf):
            return jnp.finfo(leaf.dtype).dtype  # the real dtype, also for a complex leaf
    return jnp.result_type(float)


def example_input(model: Any) -> jax.Array | None:
    """A stand-in for one step's input, from the size the model declares (`None` if it does
    not), in the model's own floating dtype.

    Zeros rather than a `jax.ShapeDtypeStruct`, because it is passed to `init_cell_trace`,
    whose `x: Input` annotation (checked by jaxtyping/beartype) admits arrays only.
    """
    size = input_size(model)
    return None if size is None else jnp.zeros((size,), floating_dtype(model))


def require_example_input(model: Any, x: Any) -> None:
    if x is None:
        raise ValueError(
            f"{type(model).__name__} does not declare an `input_size`, so the shape of its input "
            "is unknown: pass an example input of one step, `algorithm.init_trace(model, state, "
            "x)` or `eqtrace.init_state_and_trace(model, algorithm, x=x)`."
        )
