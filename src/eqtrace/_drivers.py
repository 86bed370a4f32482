"""Pure, jit-friendly drivers on top of a step function: run, accumulate, train, and BPTT."""

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from typing_extensions import TypeAliasType

from ._algorithm import AbstractAlgorithm
from ._cell import AbstractCell
from ._custom_types import ExampleInput, Input, KeyLike, Params, Scalar, State, Trace
from ._fidelity import Fidelity, FidelityMonitor, leaf_paths, setup_monitor
from ._plan import prepare
from ._validation import (
    check_count,
    check_input,
    check_key,
    check_model,
    check_parameters_enter_step,
    check_step_keeps_state,
    is_key,
)


#: `online_step(params, state, trace, x) -> (state, trace, y)`, from `make_online_step`.
OnlineStep = TypeAliasType(
    "OnlineStep", Callable[[Params, State, Trace, Input], tuple[State, Trace, Any]]
)
#: The same signature, but `T` steps at once: inputs and outputs carry a leading time axis.
OnlineBlock = TypeAliasType(
    "OnlineBlock", Callable[[Params, State, Trace, Input], tuple[State, Trace, Any]]
)
#: `forward_step(params, state, x) -> (state, y)`, from `make_forward_step`.
ForwardStep = TypeAliasType("ForwardStep", Callable[[Params, State, Input], tuple[State, Any]])
#: `loss_fn(y_t, target_t) -> scalar`, the loss of one step.
LossFn = TypeAliasType("LossFn", Callable[[Any, Any], Scalar])
#: How the accumulating drivers combine the losses of the steps: `"sum"`, their (weighted)
#: sum, or `"mean"`, divided by the sum of the step weights (by `T` without them). A plain
#: `str`, not a `Literal`, so that a wrong value meets eqtrace's own error message (which
#: lists the choices) rather than a runtime type checker's.
Reduction = str
#: Per-step weights of the loss, shape `(T,)`: a boolean mask or floats.
StepWeights = Any


def make_online_step(algorithm: AbstractAlgorithm, static: Any, *, plan: Any = None) -> OnlineStep:
    """The pure online step `online_step(params, state, trace, x) -> (state, trace, y)`.

    **Arguments:**

    - `algorithm`: the online rule, e.g. `eqtrace.DRTRL()`.
    - `static`: the non-array part of the model, from
      `params, static = eqx.partition(model, eqx.is_inexact_array)`.
    - `plan`: `eqtrace.prepare(algorithm, model, x)`, if prepared already (e.g. for
      `init_trace`); else the step prepares it on its first call and keeps it.

    **Returns:** a function to `jax.vmap` over a batch (`in_axes=(None, 0, 0, 0)`: parameters
    shared) and `jax.lax.scan` over time. `jax.grad` of a loss on `y` with respect to `params` is
    the online gradient estimate of that step. It raises a `ValueError` if `params` is not
    shaped like the model that `static` came from.
    """

    check_model("make_online_step", "static", static)
    static_def = _structure(static)
    plans = _Plans(algorithm, plan)

    def online_step(params, state, trace, x):
        model = _combine("online_step", params, static, static_def)
        return algorithm.step(model, state, trace, x, plan=plans.get(model, x))

    setattr(online_step, _KIND, "step")
    setattr(online_step, _RULE, algorithm)
    setattr(online_step, _STATIC, _Static(static))
    return online_step


def make_online_block(
    algorithm: AbstractAlgorithm, static: Any, *, plan: Any = None
) -> OnlineBlock:
    """The pure online block `online_block(params, state, trace, xs) -> (state, trace, ys)`:
    as many steps as `xs` has entries along its leading (time) axis, `ys` stacked likewise.

    Values and gradients are those of the online step called once per entry; the algorithm
    may compute them in fewer passes over the trace (`DRTRL` reads and writes its trace once
    per block instead of once per step, which is several times faster for large traces).
    The gradient of a step is then available at the end of its block, not right after it.

    **Arguments:** as for `make_online_step`.

    **Returns:** a function to `jax.vmap` over a batch with time kept leading:
    `jax.vmap(online_block, in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1))`; pass it to
    `online_gradient(..., block_size=C)`.
    """

    check_model("make_online_block", "static", static)
    static_def = _structure(static)
    plans = _Plans(algorithm, plan)

    def online_block(params, state, trace, xs):
        model = _combine("online_block", params, static, static_def)
        first = jtu.tree_map(lambda a: a[0], xs)
        return algorithm.steps(model, state, trace, xs, plan=plans.get(model, first))

    setattr(online_block, _KIND, "block")
    setattr(online_block, _RULE, algorithm)
    setattr(online_block, _STATIC, _Static(static))
    return online_block


def make_forward_step(static: Any) -> ForwardStep:
    """The plain step `forward_step(params, state, x) -> (state, y)` of the model, without any
    trace: the baseline for `bptt_gradient` and for inference.

    **Arguments:**

    - `static`: the non-array part of the model, from
      `params, static = eqx.partition(model, eqx.is_inexact_array)`.

    **Returns:** a function to `jax.vmap` over a batch (`in_axes=(None, 0, 0)`) and
    `jax.lax.scan` over time. It raises a `ValueError` if `params` is not shaped like the
    model that `static` came from.
    """

    check_model("make_forward_step", "static", static)
    static_def = _structure(static)

    def forward_step(params, state, x):
        model = _combine("forward_step", params, static, static_def)
        check_step_keeps_state(model, state, x)
        check_parameters_enter_step(model, state, x)
        return model(state, x)

    setattr(forward_step, _KIND, "forward")
    return forward_step


#: The attribute that marks the functions made by `make_online_step` ("step") and
#: `make_online_block` ("block"), so that the drivers can tell which one they were given.
_KIND = "_eqtrace_kind"
#: The attribute that holds the rule an online step or block was made with.
_RULE = "_eqtrace_rule"
#: The attribute that holds the `static` an online step or block was made with (for the
#: fidelity monitor's reference, which runs the model's own forward step).
_STATIC = "_eqtrace_static"


@dataclasses.dataclass(frozen=True)
class _Static:
    """`static` in a box, so that `_marked` tells it from a missing attribute even when it is
    a falsy pytree."""

    static: Any


class _Plans:
    """The plans of one online step function, prepared on its first call (usually inside
    `jit`, from shapes) and then reused: one per layout of the parameters and the input, as a
    step built from one `static` sees the same model structure, integer and boolean fields
    every time. A trace of a new layout is refused by the step's own check."""

    def __init__(self, algorithm: AbstractAlgorithm, given: Any = None):
        self.algorithm = algorithm
        self.given = given  # a plan the caller prepared: used for every call
        self.plans: dict[Any, Any] = {}

    def get(self, model: AbstractCell, x: Any) -> Any:
        check_input(model, x)  # The step's own check, before the plan reads `x`'s shape.
        if self.given is not None:
            return self.given
        key = _layout(eqx.filter(model, eqx.is_inexact_array)), _layout(x)
        if key not in self.plans:
            self.plans[key] = prepare(self.algorithm, model, x)
        return self.plans[key]


def _layout(tree: Any) -> tuple:
    """The structure of `tree`, and the shape and dtype of each leaf (arrays and scalars)."""
    leaves, treedef = jtu.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(a)), jnp.result_type(a).name) for a in leaves)


def _is_none(x: Any) -> bool:
    return x is None


def _structure(tree: Any) -> Any:
    """The structure `eqx.combine` matches: with the `None` placeholders of a partition."""
    return jtu.tree_structure(tree, is_leaf=_is_none)


def _combine(function: str, params: Any, static: Any, static_def: Any) -> Any:
    """`eqx.combine(params, static)`, raising a clear error if they are not halves of one
    model."""
    if _structure(params) != static_def:
        raise ValueError(
            f"{function}: `params` does not fit `static`: both must come from partitioning one "
            f"model, but {_difference(params, static) or 'their pytree structures differ'}. "
            "Partition the model once, `params, static = eqx.partition(model, "
            "eqx.is_inexact_array)`, build the step from that `static` and pass that `params` "
            "(or parameters trained from it)."
        )
    return eqx.combine(params, static)


def _difference(params: Any, static: Any, path: str = "") -> str | None:
    """Where two pytrees that should have one structure first differ, in words (`None` if
    nowhere that this finds: a `None` placeholder matches anything)."""
    if params is None or static is None:
        return None
    if type(params) is not type(static):
        where = f" at `{path}`" if path else ""
        return (
            f"`params`{where} is of type {type(params).__name__} and `static`{where} of type "
            f"{type(static).__name__}"
        )
    children: list[tuple[str, Any, Any]] = []
    if isinstance(params, eqx.Module):
        # The fields set at construction (sizes, hyperparameters) first: the likeliest cause.
        for field in dataclasses.fields(params):
            a, b = getattr(params, field.name, None), getattr(static, field.name, None)
            if not field.metadata.get("static", False):
                children.append((f"{path}.{field.name}", a, b))
                continue
            try:
                same = bool(a == b)
            except Exception:  # e.g. arrays held in a static field
                same = a is b
            if not same:
                return f"`{path}.{field.name}` is {a!r} in `params` and {b!r} in `static`"
    elif isinstance(params, list | tuple):
        if len(params) != len(static):
            return f"`params{path}` has {len(params)} entries and `static{path}` {len(static)}"
        children = [(f"{path}[{i}]", a, b) for i, (a, b) in enumerate(zip(params, static))]
    elif isinstance(params, dict):
        if set(params) != set(static):
            return f"`params{path}` has the keys {list(params)} and `static{path}` {list(static)}"
        children = [(f"{path}[{k!r}]", params[k], static[k]) for k in params]
    for child_path, a, b in children:
        found = _difference(a, b, child_path)
        if found is not None:
            return found
    return None


def _kind(function: Any) -> str | None:
    """Which of `make_online_step` ("step"), `make_online_block` ("block") or
    `make_forward_step` ("forward") made `function`; `None` for other functions, which are
    then not checked."""
    return _marked(function, _KIND)


def _rule_of(function: Any) -> AbstractAlgorithm | None:
    """The rule an online step or block was made with, or `None` for other functions."""
    return _marked(function, _RULE)


def _marked(function: Any, attribute: str) -> Any:
    """`attribute` of `function`, also through `jax.vmap`, `eqx.filter_vmap`, `jax.jit` and
    the like (they keep the original in `__wrapped__`), or `None`."""
    seen = set()
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        value = getattr(function, attribute, None)
        if value is not None:
            return value
        function = getattr(function, "__wrapped__", None)
    return None


def _check_kind(function: str, online_step: Any, block_size: int | None) -> None:
    kind = _kind(online_step)
    if kind == "forward":
        raise TypeError(
            f"{function}: `online_step` must be an online step (from `make_online_step`), but "
            "received a forward step (from `make_forward_step`), which has no trace and takes "
            "no `trace` argument. Pass `eqtrace.make_online_step(algorithm, static)`; for "
            "the BPTT gradient of a forward step, call `eqtrace.bptt_gradient`."
        )
    if block_size is not None and kind == "step":
        raise TypeError(
            f"{function}: with `block_size={block_size}`, `online_step` must be an online block "
            "(from `make_online_block`, taking `xs` with a leading time axis), but received an "
            "online step (from `make_online_step`). Pass "
            "`eqtrace.make_online_block(algorithm, static)` (for a batch, "
            "`jax.vmap(block, in_axes=(None, 0, 0, 1), out_axes=(0, 0, 1))`), or drop "
            "`block_size`."
        )
    if block_size is None and kind == "block":
        fix = "pass `block_size=...` to run it that many steps at a time"
        raise TypeError(
            f"{function}: `online_step` must be an online step (from `make_online_step`) when "
            "no `block_size` is given, "
            f"but received an online block (from `make_online_block`). Either {fix}, or pass "
            "`eqtrace.make_online_step(algorithm, static)`."
        )


@contextlib.contextmanager
def _batch_sizes_explained(function: str, state: Any, trace: Any, xs: Any):
    """Turns JAX's "vmap got inconsistent sizes" from a batched step (batch-major inputs, an
    unbatched state or trace, or batch sizes that differ) into an error naming the sizes."""
    try:
        yield
    except ValueError as error:
        if "inconsistent sizes" not in str(error):
            raise

        def leading(tree, axis):
            sizes = {np.shape(a)[axis] for a in jtu.tree_leaves(tree) if np.ndim(a) > axis}
            return sorted(sizes)

        raise ValueError(
            f"{function}: the batched step was given arguments of different batch sizes: the "
            f"state's leading axes have sizes {leading(state, 0)}, the trace's "
            f"{leading(trace, 0)}, and the inputs' second axes {leading(xs, 1)} (the inputs "
            "are time-major, `(T, B, ...)`). Create the state and trace for the batch with "
            "`eqtrace.init_state_and_trace(model, algorithm, batch_size=B)`, and pass inputs "
            "of shape `(T, B, ...)` (`jnp.swapaxes(xs, 0, 1)` for batch-major data)."
        ) from error


def _check_optimizer(
    optimizer: Any,
    opt_state: Any,
    params: Any,
    function: str = "train_online",
    trained: str = "params",
) -> None:
    """Refuses what is not an Optax optimiser, and an optimiser state that is not this
    optimiser's for these parameters (another optimiser's, or one made for other
    parameters): both would fail inside Optax. `function` is the driver's name and `trained`
    what its optimiser is initialised with, for the messages."""
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            f"{function}: `optimizer` must be an Optax optimiser (with `init` and `update`, "
            f"e.g. `optax.adam(1e-3)`), but received {optimizer!r}. To compute gradients "
            "without updating, call `eqtrace.online_gradient` instead."
        )
    expected = jax.eval_shape(optimizer.init, params)
    received = jtu.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), opt_state
    )

    def layout(tree):
        leaves, treedef = jtu.tree_flatten(tree)
        return treedef, [leaf.shape for leaf in leaves]

    (expected_def, expected_shapes), (received_def, received_shapes) = map(
        layout, (expected, received)
    )
    if expected_def != received_def or expected_shapes != received_shapes:
        differing = [i for i, (a, b) in enumerate(zip(expected_shapes, received_shapes)) if a != b]
        where = " (their pytree structures differ)"
        if len(expected_shapes) == len(received_shapes) and differing:
            i = differing[0]
            where = (
                f" (array {i} has shape {received_shapes[i]}, where these parameters need "
                f"{expected_shapes[i]})"
            )
        raise ValueError(
            f"{function}: `opt_state` is not the state of this optimiser for these "
            f"parameters: `optimizer.init({trained})` is {_summary(expected)}, but `opt_state` "
            f"is {_summary(received)}{where}. Create it with `optimizer.init({trained})` for "
            "the parameters being trained (a state restored from a checkpoint must come from "
            "the same optimiser and model)."
        )


def _summary(tree: Any) -> str:
    """The top-level node types of an optimiser state and its number of arrays, in words."""
    top = tree if type(tree) is tuple else (tree,)
    names = ", ".join(type(node).__name__ for node in top)
    return f"({names}) holding {len(jtu.tree_leaves(tree))} arrays"


def _check_forward(function: str, forward_step: Any) -> None:
    kind = _kind(forward_step)
    if kind in ("step", "block"):
        made_by = "make_online_step" if kind == "step" else "make_online_block"
        raise TypeError(
            f"{function}: `forward_step` must be a plain step `(params, state, x) -> (state, "
            f"y)` (from `make_forward_step`), but received an online {kind} (from `{made_by}`), "
            "which takes a trace. Pass `eqtrace.make_forward_step(static)`; for the online "
            "gradient of an online step, call `eqtrace.online_gradient`."
        )


def init_state_and_trace(
    model: AbstractCell,
    algorithm: AbstractAlgorithm,
    batch_size: int | None = None,
    x: ExampleInput | None = None,
    *,
    key: KeyLike | None = None,
) -> tuple[State, Trace]:
    """The initial state and trace of `model`, with a leading batch axis if `batch_size` is set.

    **Arguments:**

    - `model`: a cell or `eqtrace.nn.Sequential`.
    - `algorithm`: the online rule whose trace to create.
    - `batch_size`: if given, the state and trace gain a leading batch axis of that size.
      Every sample starts from the same initial values, except the PRNG keys of rules that
      draw random numbers (`eqtrace.UORO`): sample `i` gets `jax.random.split(k, batch_size)[i]`
      of the trace's key `k`, so that the samples draw independent noise.
    - `x`: an example input of one step of one sample (only its shape and dtype are used),
      needed when the model does not declare an `input_size`.
    - `key`: a PRNG key (`jax.random.key(seed)`) that replaces the key the algorithm was built
      with, for rules that draw random numbers: pass a fresh one for each batch of sequences
      so that they do not all draw the same noise. Ignored by the other rules.

    **Returns:** `(state, trace)`, the pytrees to pass to the online step.
    """
    check_model("init_state_and_trace", "model", model)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
            raise TypeError(
                "init_state_and_trace: `batch_size` must be a Python int (the number of "
                f"sequences in a batch) or None, but received {batch_size!r} "
                f"({type(batch_size).__name__})."
            )
        if batch_size < 1:
            raise ValueError(
                "init_state_and_trace: `batch_size` must be >= 1 (the number of sequences in a "
                f"batch), but received {batch_size}: a batch of none has no loss to learn from. "
                "Pass `batch_size=None` for one unbatched sequence."
            )
        batch_size = int(batch_size)
    state = model.init_state()
    trace = algorithm.init_trace(model, state, x)
    if key is not None:
        check_key("init_state_and_trace", "key", key, "`key=jax.random.key(0)`")
        trace = _reseed(trace, key)
    if batch_size is None:
        return state, trace

    def batch(a):
        if is_key(a):  # independent noise per sample
            return jax.random.split(a, batch_size)
        return jnp.broadcast_to(a, (batch_size, *a.shape))

    return jtu.tree_map(batch, (state, trace))


def _reseed(trace: Trace, key: KeyLike) -> Trace:
    """`trace` with its PRNG keys replaced: by `key` itself if it holds one, else by keys
    folded from it (one per key leaf, all different)."""
    leaves, treedef = jtu.tree_flatten(trace)
    keys = [i for i, leaf in enumerate(leaves) if is_key(leaf)]
    for n, i in enumerate(keys):
        leaves[i] = key if len(keys) == 1 else jax.random.fold_in(key, n)
    return jtu.tree_unflatten(treedef, leaves)


@eqx.filter_jit
def run_online(
    online_step: OnlineStep | OnlineBlock,
    params: Params,
    state: State,
    trace: Trace,
    xs: Input,
    *,
    block_size: int | None = None,
) -> tuple[Any, State, Trace]:
    """Runs `online_step` over the leading (time) axis of `xs` (inference, or a forward pass
    that keeps the trace up to date without computing a gradient).

    **Arguments:**

    - `online_step`: from `make_online_step` (vmapped for a batch); with `block_size`, an
      online block from `make_online_block` (vmapped with time leading).
    - `params`, `state`, `trace`: as for `online_step`.
    - `xs`: the inputs, with a leading time axis.
    - `block_size`: run the block this many steps at a time (the last block takes the
      remainder), as `online_gradient` does; `None` (the default) for a step.

    **Returns:** `(ys, state, trace)`: the outputs stacked over time and the final state and trace.
    """
    if block_size is not None:
        check_count("run_online", "block_size", block_size)
    _check_kind("run_online", online_step, block_size)
    _check_sequences("run_online", xs)

    def body(carry, x):
        state, trace = carry
        state, trace, y = online_step(params, state, trace, x)
        return (state, trace), y

    with _batch_sizes_explained("run_online", state, trace, xs):
        if block_size is None:
            (state, trace), ys = jax.lax.scan(body, (state, trace), xs)
        else:
            (state, trace), ys = _scan_blocks(body, (state, trace), xs, block_size)
    return ys, state, trace


def _step_loss_and_grad(online_step, loss_fn, params, state, trace, *inputs):
    def step_loss(params):
        x, *rest = inputs
        new_state, new_trace, y = online_step(params, state, trace, x)
        return loss_fn(y, *rest), (new_state, new_trace)

    return jax.value_and_grad(step_loss, has_aux=True)(params)


@eqx.filter_jit
def online_gradient(
    online_step: OnlineStep | OnlineBlock,
    loss_fn: LossFn,
    params: Params,
    state: State,
    trace: Trace,
    xs: Input,
    targets: Any,
    *,
    block_size: int | None = None,
    reduction: Reduction = "mean",
    step_weights: StepWeights | None = None,
    sequence_targets: bool = False,
) -> tuple[Scalar, Params, State, Trace]:
    """Accumulates the online gradient of the mean `Σ_t w_t loss_fn(y_t, target_t) / Σ_t w_t`
    over a sequence (or of the sum, with `reduction="sum"`).

    Memory is constant in the sequence length: the gradient of each step is taken within the
    step (or within its block) and summed, never through the whole scan.

    **Arguments:**

    - `online_step`: from `make_online_step` (vmapped for a batch); with `block_size`, an
      online block from `make_online_block` (vmapped with time leading).
    - `loss_fn`: `loss_fn(y_t, target_t) -> scalar` for one step (average over the batch inside
      it when `online_step` is vmapped).
    - `params`, `state`, `trace`: as for `online_step`.
    - `xs`: the inputs, with a leading time axis of length `T`.
    - `targets`: the targets, with the same leading time axis; with `sequence_targets=True`,
      without it (one target for the whole sequence, e.g. a class label).
    - `block_size`: if given, run `block_size` steps per call of the online block (a last,
      shorter block takes the remainder). The result is the same; the extra memory is that of
      one block's per-step Jacobians. A step from `make_online_step` with `block_size`, or a
      block from `make_online_block` without it, raises a `TypeError`.
    - `reduction`: `"mean"` (the default) divides the summed losses and gradients by
      `Σ_t w_t` (by `T` without `step_weights`), so that the loss reads as a per-step loss and
      the learning rate does not depend on the sequence length, as in Optax's losses;
      `"sum"` keeps the sums (a sequence of no steps then gives zeros instead of an error).
    - `step_weights`: optional weights `w_t` of the steps' losses, shape `(T,)`, booleans or
      floats: `jnp.arange(T) == T - 1` puts the loss on the last step only. (Per-sample masks
      belong in `loss_fn`, which sees the whole batch.)
    - `sequence_targets`: `True` if `targets` has no time axis: the same target is used at
      every step (combine with `step_weights` for a loss on chosen steps only).

    **Returns:** `(loss, grads, state, trace)`: the reduced loss, the reduced online gradient,
    and the final state and trace.
    """
    if block_size is not None:
        check_count("online_gradient", "block_size", block_size)
    _check_kind("online_gradient", online_step, block_size)
    objective = _Objective.build(
        "online_gradient",
        loss_fn,
        xs,
        targets,
        reduction,
        step_weights,
        sequence_targets,
        online_step,
    )

    def call_loss(ys, targets, weights):
        """The loss of one call of `online_step`: of one step, or of a block's steps summed."""
        if block_size is None:
            return objective.weighted_loss(ys, targets, weights)
        return jnp.sum(jax.vmap(objective.weighted_loss)(ys, targets, weights))

    def body(carry, inputs):
        state, trace, loss, grads = carry
        (step_loss, (state, trace)), step_grads = _step_loss_and_grad(
            online_step, call_loss, params, state, trace, *inputs
        )
        grads = jtu.tree_map(jnp.add, grads, step_grads)
        return (state, trace, loss + step_loss, grads), None

    zeros = jtu.tree_map(jnp.zeros_like, params)
    init = (state, trace, jnp.zeros((), jnp.result_type(float)), zeros)
    with _batch_sizes_explained("online_gradient", state, trace, xs):
        if block_size is None:
            (state, trace, loss, grads), _ = jax.lax.scan(body, init, objective.sequences)
        else:
            sequences = objective.sequences
            (state, trace, loss, grads), _ = _scan_blocks(body, init, sequences, block_size)
    loss, grads = objective.reduce(loss, grads)
    return loss, grads, state, trace


@dataclasses.dataclass(frozen=True)
class _Objective:
    """The loss over a sequence that a driver accumulates: which target and weight each step
    pairs with its output, and how the steps' losses are reduced.

    `sequences = (xs, per-step targets or None, weights or None)` is what the driver scans;
    `weighted_loss(y_t, target_t, w_t)` is the loss of one step, `reduce` the final reduction.
    """

    function: str  # the driver's name, for its messages
    loss_fn: LossFn
    sequences: tuple[Any, Any, Any]
    sequence_targets: Any  # the targets used at every step, or None
    total_weight: Any  # the divisor of `reduction="mean"`, or None for a sum
    check_finite: bool = False  # raise on a non-finite step loss (the rule's `check_finite`)

    @classmethod
    def build(
        cls,
        function,
        loss_fn,
        xs,
        targets,
        reduction,
        step_weights,
        sequence_targets,
        step=None,
    ) -> "_Objective":
        if reduction not in ("sum", "mean"):
            raise ValueError(
                f'{function}: `reduction` must be "sum" or "mean" (over the steps), but '
                f"received {reduction!r}."
            )
        if not isinstance(sequence_targets, bool):
            raise TypeError(
                f"{function}: `sequence_targets` must be True or False, but received "
                f"{sequence_targets!r}."
            )
        length = _check_sequences(function, xs, None if sequence_targets else targets)
        weights = _check_step_weights(function, step_weights, length)
        if reduction == "sum":
            total = None
        elif weights is None:
            if length == 0:
                raise ValueError(
                    f'{function}: with `reduction="mean"` the loss is divided by the number of '
                    "steps, but `xs` holds none (its time axis has length 0): a mean over no "
                    'steps is undefined. Skip empty sequences, or use `reduction="sum"` (zero '
                    "loss and gradients for no steps)."
                )
            total = length if length is not None else 1
        else:
            total = eqx.error_if(
                jnp.sum(weights),
                jnp.sum(weights) == 0,
                f'{function}: with `reduction="mean"` the loss is divided by the sum of '
                "`step_weights`, but it is zero (no step carries a loss). Give at least one "
                'step a weight, or use `reduction="sum"`.',
            )
        return cls(
            function=function,
            loss_fn=_scalar_loss(function, loss_fn),
            sequences=(xs, None if sequence_targets else targets, weights),
            sequence_targets=targets if sequence_targets else None,
            total_weight=total,
            check_finite=bool(getattr(_rule_of(step), "check_finite", False)),
        )

    def step_loss(self, y, target):
        """`loss_fn` of one step, unweighted."""
        if self.sequence_targets is None:
            loss = self.loss_fn(y, target)
        else:
            self._check_sequence_targets(y)
            loss = self.loss_fn(y, self.sequence_targets)
        if not self.check_finite:
            return loss
        # The step has checked its state and trace already: what is left is the loss's input.
        return eqx.error_if(
            loss,
            jnp.logical_not(jnp.isfinite(loss)),
            f"{self.function}: the loss of a step became non-finite (NaN or inf) while the "
            "state and trace are finite (the rule's `check_finite=True`): check the targets "
            "(a NaN or inf target) and `loss_fn`.",
        )

    def _check_sequence_targets(self, y):
        # A target with more axes than the output it is compared with broadcasts the loss over
        # them: targets that kept their time axis would be compared with every step's output.
        if jtu.tree_structure(y) != jtu.tree_structure(self.sequence_targets):
            return
        for (path, out), target in zip(
            jtu.tree_leaves_with_path(y), jtu.tree_leaves(self.sequence_targets)
        ):
            if jnp.ndim(target) > jnp.ndim(out):
                raise ValueError(
                    f"{self.function}: with `sequence_targets=True` the same targets are used "
                    f"at every step, but `targets{jtu.keystr(path)}` of shape "
                    f"{jnp.shape(target)} has more axes than the step's output of shape "
                    f"{jnp.shape(out)}: the loss would broadcast over the extra axis. For one "
                    "target per step (a leading time axis), pass `sequence_targets=False`; for "
                    "one per sequence, drop the time axis (e.g. `targets[-1]`)."
                )

    def weighted_loss(self, y, target, weight):
        loss = self.step_loss(y, target)
        return loss if weight is None else weight * loss

    def reduce(self, loss, grads):
        if self.total_weight is None:
            return loss, grads
        return loss / self.total_weight, jtu.tree_map(lambda g: g / self.total_weight, grads)


def _check_step_weights(function: str, step_weights: Any, length: int | None) -> Any:
    """`step_weights` as a float array of shape `(T,)`, raising a clear error otherwise."""
    if step_weights is None:
        return None
    shape, dtype = jnp.shape(step_weights), jnp.result_type(step_weights)
    expected = f"({length},)" if length is not None else "(T,)"
    if len(shape) != 1 or (length is not None and shape[0] != length):
        raise ValueError(
            f"{function}: `step_weights` must hold one weight per step, shape {expected} like "
            f"the leading (time) axis of `xs`, but received shape {shape}. For a loss on the "
            f"last step only, pass `jnp.arange(T) == T - 1`; per-sample masks belong in "
            "`loss_fn`, which sees the whole batch."
        )
    if not any(jnp.issubdtype(dtype, kind) for kind in (jnp.floating, jnp.integer, jnp.bool_)):
        raise TypeError(
            f"{function}: `step_weights` must be booleans or real numbers, but received dtype "
            f"{jnp.dtype(dtype).name}."
        )
    weights = jnp.asarray(step_weights, jnp.result_type(float))
    return weights


def _scan_blocks(body: Callable, carry: Any, sequences: Any, size: int) -> tuple[Any, Any]:
    """Runs `body(carry, block) -> (carry, outputs)` over consecutive blocks of `size` steps of
    `sequences` (leading time axis), a last, shorter block taking the remainder.

    **Returns:** the final carry, and the blocks' outputs (each with a leading axis of the
    block's steps) concatenated over time.
    """
    length = jtu.tree_leaves(sequences)[0].shape[0]
    full, rest = divmod(length, size)
    outputs = []
    if full or not rest:  # a sequence of no steps scans no blocks
        blocks = jtu.tree_map(
            lambda a: a[: full * size].reshape(full, size, *a.shape[1:]), sequences
        )
        carry, stacked = jax.lax.scan(body, carry, blocks)
        outputs.append(jtu.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), stacked))
    if rest:
        carry, last_outputs = body(carry, jtu.tree_map(lambda a: a[full * size :], sequences))
        outputs.append(last_outputs)
    return carry, jtu.tree_map(lambda *parts: jnp.concatenate(parts), *outputs)


def _check_sequences(function: str, xs: Any, targets: Any = None) -> int | None:
    """Raises unless every leaf of `xs` and of `targets` has one leading (time) length.

    **Returns:** that length (`None` if `xs` has no leaves).
    """
    shapes = [(jtu.keystr(p), jnp.shape(leaf)) for p, leaf in jtu.tree_leaves_with_path(xs)]
    if not shapes:
        return None
    if any(shape == () for _, shape in shapes) or len({shape[0] for _, shape in shapes}) > 1:
        received = ", ".join(f"`xs{path}` {shape}" for path, shape in shapes)
        raise ValueError(
            f"{function}: `xs` must hold the inputs of every step along a leading time axis, "
            f"one length for all its leaves, but received the shapes {received}. Stack the "
            "inputs over time first: `xs[t]` is the input of step `t`."
        )
    length = shapes[0][1][0]
    for path, leaf in jtu.tree_leaves_with_path(targets):
        shape = jnp.shape(leaf)
        if shape[:1] != (length,):
            raise ValueError(
                f"{function}: `targets` must hold one target per step, with the leading (time) "
                f"length {length} of `xs`, but received `targets{jtu.keystr(path)}` of shape "
                f"{shape} (and `xs` of shape {shapes[0][1]}). For one target per sequence, used "
                "at every step, pass `sequence_targets=True`; for a loss on the last step only, "
                f"add `step_weights=jnp.arange({length}) == {length - 1}`."
            )
    return length


def _scalar_loss(function: str, loss_fn: LossFn) -> LossFn:
    """`loss_fn`, raising a clear error (at trace time) if it does not return a scalar."""

    def checked_loss(y, target):
        loss = loss_fn(y, target)
        dtype = (
            jnp.result_type(loss)
            if hasattr(loss, "dtype") or isinstance(loss, float | int)
            else None
        )
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or jnp.shape(loss) != ():
            received = (
                f"shape {jnp.shape(loss)} and dtype {jnp.dtype(dtype).name}"
                if dtype is not None
                else f"a {type(loss).__name__}"
            )
            raise ValueError(
                f"{function}: `loss_fn(y_t, target_t)` must return the loss of one step as a "
                f"scalar float, but returned {received}. Reduce it inside `loss_fn`, e.g. "
                "`jnp.mean((y - target) ** 2)` (with a vmapped step, `y` and `target` hold the "
                "whole batch: average over it there too)."
            )
        return loss

    return checked_loss


@eqx.filter_jit
def train_online(
    online_step: OnlineStep | OnlineBlock,
    loss_fn: LossFn,
    # `optax.MultiSteps` is not a `GradientTransformation` instance, but has the same interface.
    optimizer: optax.GradientTransformation | optax.MultiSteps,
    params: Params,
    opt_state: optax.OptState,
    state: State,
    trace: Trace,
    xs: Input,
    targets: Any,
    *,
    block_size: int | None = None,
    step_weights: StepWeights | None = None,
    sequence_targets: bool = False,
    monitor: FidelityMonitor | None = None,
) -> (
    tuple[Params, optax.OptState, State, Trace, Any]
    | tuple[Params, optax.OptState, State, Trace, Any, Fidelity]
):
    """Trains truly online: an optimiser update after every step, inside one `lax.scan`.

    For an update every `k` steps, pass `optax.MultiSteps(optimizer, every_k_schedule=k)` (and
    its `init`ialised state): it accumulates the online gradients and applies them every `k`.
    Or pass an online block (`make_online_block`) with `block_size=k`: one update per block
    with the mean of its steps' online gradients, the same as `MultiSteps` on the stepped
    version, in fewer passes over the trace. A last, shorter block takes the remainder of the
    sequence (one update with the mean of its steps).

    **Arguments:**

    - `online_step`: from `make_online_step` (vmapped for a batch); with `block_size`, an
      online block from `make_online_block` (vmapped with time leading).
    - `loss_fn`: `loss_fn(y_t, target_t) -> scalar` for one step (average over the batch inside
      it when `online_step` is vmapped).
    - `optimizer`: an Optax optimiser; `opt_state` its state, `optimizer.init(params)`.
    - `params`, `state`, `trace`: as for `online_step`.
    - `xs`, `targets`: inputs and targets with a leading time axis (`targets` without it if
      `sequence_targets=True`: the same target at every step).
    - `block_size`: if given, one update per block of `block_size` steps (a last, shorter
      block takes the remainder), as in `online_gradient`.
    - `step_weights`: optional weights of the steps' losses, shape `(T,)` (booleans or floats).
      A step of weight zero contributes a zero gradient, but the optimiser still takes its
      update (momentum moves the parameters); to update only every `k` steps use blocks or
      `optax.MultiSteps`.
    - `sequence_targets`: `True` if `targets` has no time axis.
    - `monitor`: an `eqtrace.FidelityMonitor`, to measure now and then how close the online
      gradient is to an exact one while training (see "Monitoring fidelity" in the docs);
      `None` (the default) measures nothing and costs nothing. It needs `online_step` from
      `make_online_step` or `make_online_block`, and does not change the training.

    **Returns:** `(params, opt_state, state, trace, losses)`: the trained parameters, the
    optimiser state, the final state and trace, and the per-step values of `loss_fn` (before
    weighting), stacked over time. With a `monitor`, a sixth entry: the `eqtrace.Fidelity`
    it measured (one entry per measured update).
    """
    if block_size is not None:
        check_count("train_online", "block_size", block_size)
    _check_kind("train_online", online_step, block_size)
    _check_optimizer(optimizer, opt_state, params)
    objective = _Objective.build(
        "train_online", loss_fn, xs, targets, "sum", step_weights, sequence_targets, online_step
    )
    watch = None
    if monitor is not None:
        static = _marked(online_step, _STATIC)
        watch = setup_monitor(
            monitor,
            online_step,
            objective,
            params,
            state,
            trace,
            block_size,
            None if static is None else static.static,
            _rule_of(online_step),
        )

    def weighted(losses, weights):
        return losses if weights is None else weights * losses

    def step_loss(ys, targets, weights):
        loss = objective.step_loss(ys, targets)
        return weighted(loss, weights), loss

    def block_loss(params, state, trace, xs, targets, weights):
        state, trace, ys = online_step(params, state, trace, xs)
        losses = jax.vmap(objective.step_loss)(ys, targets)
        return jnp.mean(weighted(losses, weights)), (state, trace, losses)

    def body(carry, inputs):
        if watch is not None:
            carry, (update, watched) = carry
            params, _, state, trace = carry
            # The monitor reads the update's parameters, state and trace before the update.
            watched, metrics = watch.measure(update, watched, params, state, trace, inputs)
            if block_size is not None:  # `_scan_blocks` concatenates its outputs over time
                metrics = jtu.tree_map(lambda a: a[None], metrics)
            carry, losses = train(carry, inputs)
            return (carry, (update + 1, watched)), (losses, metrics)
        return train(carry, inputs)

    def train(carry, inputs):
        params, opt_state, state, trace = carry
        if block_size is None:
            x, targets, weights = inputs

            def differentiated(params):
                new_state, new_trace, y = online_step(params, state, trace, x)
                loss, unweighted = step_loss(y, targets, weights)
                return loss, (new_state, new_trace, unweighted)

            (_, (state, trace, losses)), grads = jax.value_and_grad(differentiated, has_aux=True)(
                params
            )
        else:
            (_, (state, trace, losses)), grads = jax.value_and_grad(block_loss, has_aux=True)(
                params, state, trace, *inputs
            )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, state, trace), losses

    carry = (params, opt_state, state, trace)
    if watch is not None:
        carry = (carry, (jnp.zeros((), jnp.int32), watch.init_carry(state)))
    with _batch_sizes_explained("train_online", state, trace, xs):
        if block_size is None:
            carry, outputs = jax.lax.scan(body, carry, objective.sequences)
        else:
            carry, outputs = _scan_blocks(body, carry, objective.sequences, block_size)
    if watch is None:
        params, opt_state, state, trace = carry
        return params, opt_state, state, trace, outputs
    (params, opt_state, state, trace), _ = carry
    losses, metrics = outputs
    fidelity = watch.result(metrics, *leaf_paths(params))
    return params, opt_state, state, trace, losses, fidelity


def _unrolled_loss(forward_step, objective, params, state, sequences):
    def body(carry, inputs):
        state, loss = carry
        x, target, weight = inputs
        state, y = forward_step(params, state, x)
        return (state, loss + objective.weighted_loss(y, target, weight)), None

    init = (state, jnp.zeros((), jnp.result_type(float)))
    (state, loss), _ = jax.lax.scan(body, init, sequences)
    return loss, state


@eqx.filter_jit
def bptt_gradient(
    forward_step: ForwardStep,
    loss_fn: LossFn,
    params: Params,
    state: State,
    xs: Input,
    targets: Any,
    *,
    reduction: Reduction = "mean",
    step_weights: StepWeights | None = None,
    sequence_targets: bool = False,
) -> tuple[Scalar, Params, State]:
    """The reference gradient: `jax.grad` of the mean (by default) or sum over the steps of
    `w_t loss_fn(y_t, target_t)` through `lax.scan` (backpropagation through time; memory
    grows linearly with the sequence length).

    **Arguments:**

    - `forward_step`: from `make_forward_step` (vmapped for a batch:
      `jax.vmap(forward_step, in_axes=(None, 0, 0))`).
    - `loss_fn`: `loss_fn(y_t, target_t) -> scalar` for one step.
    - `params`: the parameters; `state` the initial state (`model.init_state()`, batched for
      a batch).
    - `xs`, `targets`, `reduction`, `step_weights`, `sequence_targets`: as for
      `online_gradient`.

    **Returns:** `(loss, grads, final_state)`: the reduced loss, its gradient and the state
    after the last step.
    """
    _check_forward("bptt_gradient", forward_step)
    objective = _Objective.build(
        "bptt_gradient", loss_fn, xs, targets, reduction, step_weights, sequence_targets
    )
    (loss, state), grads = jax.value_and_grad(_unrolled_loss, argnums=2, has_aux=True)(
        forward_step, objective, params, state, objective.sequences
    )
    loss, grads = objective.reduce(loss, grads)
    return loss, grads, state


@eqx.filter_jit
def truncated_bptt_gradient(
    forward_step: ForwardStep,
    loss_fn: LossFn,
    params: Params,
    state: State,
    xs: Input,
    targets: Any,
    window: int,
    *,
    reduction: Reduction = "mean",
    step_weights: StepWeights | None = None,
    sequence_targets: bool = False,
) -> tuple[Scalar, Params, State]:
    """Truncated BPTT: backpropagation within consecutive windows of `window` steps, with the
    state carried (but not differentiated) across window boundaries.

    **Arguments:**

    - `forward_step`, `loss_fn`, `params`, `state`: as for `bptt_gradient`.
    - `xs`, `targets`, `reduction`, `step_weights`, `sequence_targets`: as for
      `online_gradient`.
    - `window`: the number of steps per window (a last, shorter window takes the remainder);
      `window >= T` is plain BPTT.

    **Returns:** `(loss, grads, final_state)`: the reduced loss, the mean (or, with
    `reduction="sum"`, the sum) of the windows' gradients, and the state after the last step.
    """
    check_count("truncated_bptt_gradient", "window", window)
    _check_forward("truncated_bptt_gradient", forward_step)
    objective = _Objective.build(
        "truncated_bptt_gradient",
        loss_fn,
        xs,
        targets,
        reduction,
        step_weights,
        sequence_targets,
    )

    def window_grad(state, sequences):
        state = jax.lax.stop_gradient(state)
        (loss, state), grads = jax.value_and_grad(_unrolled_loss, argnums=2, has_aux=True)(
            forward_step, objective, params, state, sequences
        )
        return loss, grads, state

    def body(carry, sequences):
        state, loss, grads = carry
        step_loss, step_grads, state = window_grad(state, sequences)
        return (state, loss + step_loss, jtu.tree_map(jnp.add, grads, step_grads)), None

    loss = jnp.zeros((), jnp.result_type(float))
    grads = jtu.tree_map(jnp.zeros_like, params)
    (state, loss, grads), _ = _scan_blocks(body, (state, loss, grads), objective.sequences, window)
    loss, grads = objective.reduce(loss, grads)
    return loss, grads, state
