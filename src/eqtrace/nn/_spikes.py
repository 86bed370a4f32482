"""The spikes and firing rates of a spiking model, read from its state."""

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float

from .._sequential import Sequential
from .._validation import check_model
from ._spiking import AbstractSpikingCell


#: The spikes (or rates) of a model: an array for a spiking cell, and for a `Sequential` a
#: dict from the index of each spiking layer to its own.
Spikes = Float[Array, "..."] | dict[int, Any]


def is_spiking(model: Any) -> bool:
    """Whether `model` is a spiking cell or a network holding one (at any depth)."""
    if isinstance(model, AbstractSpikingCell):
        return True
    return isinstance(model, Sequential) and any(is_spiking(layer) for layer in model.layers)


def _layer_names(model: Sequential) -> str:
    return ", ".join(f"{i}: {type(layer).__name__}" for i, layer in enumerate(model.layers))


def check_spiking(owner: str, model: Any) -> None:
    """Raises unless `model` has spikes to read: a spiking cell, or a network holding one."""
    check_model(owner, "model", model)
    if is_spiking(model):
        return
    fix = (
        "Spiking cells (`eqtrace.nn.LIF`, `eqtrace.nn.ALIF`) declare their spikes; a cell of "
        "your own does so by subclassing `eqtrace.nn.AbstractSpikingCell` and implementing "
        "`spikes(state)`."
    )
    if isinstance(model, Sequential):
        raise TypeError(
            f"{owner}: `model` must hold a spiking layer, but its layers ({_layer_names(model)}) "
            f"include none (no `eqtrace.nn.AbstractSpikingCell`). {fix}"
        )
    raise TypeError(
        f"{owner}: `model` must be a spiking cell or a network holding one, but received a "
        f"{type(model).__qualname__}, which does not spike (it is not an "
        f"`eqtrace.nn.AbstractSpikingCell`). {fix}"
    )


def sample_spikes(model: Any, state: Any) -> Spikes:
    """The spikes of one sample's state (no leading axes)."""
    if isinstance(model, AbstractSpikingCell):
        return model.spikes(state)
    return {
        i: sample_spikes(layer, layer_state)
        for i, (layer, layer_state) in enumerate(zip(model.layers, state))
        if is_spiking(layer)
    }


def _leading_shape(owner: str, name: str, model: Any, state: Any) -> tuple[int, ...]:
    """The axes that `state` has in front of every leaf of one sample's state (time, batch),
    raising if it is not laid out as the model's state with the same leading axes throughout."""
    expected = jax.eval_shape(model.init_state)

    def describe(tree):
        return str(jtu.tree_map(lambda x: tuple(jnp.shape(x)), tree))

    fix = (
        "Pass the state of `model` itself (for a network, the whole tuple of its layers' "
        "states), as the step returns it: one sample's, or stacked over time and batch."
    )
    exp_leaves, exp_def = jtu.tree_flatten(expected)
    leaves, treedef = jtu.tree_flatten(state)
    if treedef != exp_def:
        raise ValueError(
            f"{owner}: `{name}` is not a state of `model`: expected the structure {exp_def}, "
            f"but received {treedef}. {fix}"
        )
    leading = set()
    for exp, leaf in zip(exp_leaves, leaves):
        shape, sample = tuple(jnp.shape(leaf)), tuple(exp.shape)
        extra = len(shape) - len(sample)
        if extra < 0 or shape[extra:] != sample:
            leading = None
            break
        leading.add(shape[:extra])
    if leading is None or len(leading) != 1:
        raise ValueError(
            f"{owner}: `{name}` does not fit `model`: one sample's state has the shapes "
            f"{describe(expected)}, with the same leading axes (time, batch) in front of every "
            f"leaf, but received {describe(state)}. {fix}"
        )
    return leading.pop()


def _spikes(owner: str, name: str, model: Any, state: Any) -> tuple[Spikes, int]:
    check_spiking(owner, model)
    leading = _leading_shape(owner, name, model, state)
    read = lambda state: sample_spikes(model, state)  # noqa: E731
    for _ in leading:  # `spikes(state)` is written for one sample
        read = jax.vmap(read)
    return read(state), len(leading)


def spikes(model: Any, state: Any) -> Spikes:
    """The spikes of a spiking cell or network, read from its state.

    Each spiking cell (an [`eqtrace.nn.AbstractSpikingCell`][], such as
    [`eqtrace.nn.LIF`][] or [`eqtrace.nn.ALIF`][]) says where its spikes are, so this works
    without knowing how a cell stores them. The spikes are 1 where a neuron fires and 0
    elsewhere; they are the cells' own differentiable spikes, so a loss on them (a firing-rate
    penalty) has the surrogate gradient.

    ```python
    states = ...  # the network's states over a sequence, e.g. stacked by `jax.lax.scan`
    s = eqtrace.nn.spikes(net, states)  # {0: (T, hidden)} for Sequential([ALIF, LeakyReadout])
    ```

    **Arguments:**

    - `model`: a spiking cell, or an [`eqtrace.nn.Sequential`][] holding one or more.
    - `state`: the model's state: one sample's, or with leading axes in front of every leaf
      (time, batch, or both, as `jax.lax.scan` and `jax.vmap` stack it).

    **Returns:** for a cell, its spikes, of shape `(*leading, hidden)`. For a network, a dict
    from the index of each spiking layer in `model.layers` to that layer's spikes (a network
    nested as a layer gives a dict of its own); layers that do not spike have no entry.

    Raises a `TypeError` if `model` has no spiking layer, and a `ValueError` if `state` is not
    laid out as its state.
    """
    return _spikes("eqtrace.nn.spikes", "state", model, state)[0]


def rates_from_spikes(
    model: Any, s: Spikes, dt: float | None, axes: tuple[int, ...] | None
) -> Spikes:
    """The rates (Hz) of the spikes `s` of `model` (as `spikes` gives them), averaged over
    `axes` (`None`: all), with `dt` in ms or each cell's own `dt`."""
    if isinstance(model, AbstractSpikingCell):
        step = model.dt if dt is None else dt
        return jnp.mean(s, axis=axes) * (1000.0 / step)  # spikes per step -> Hz, `dt` in ms
    return {i: rates_from_spikes(model.layers[i], si, dt, axes) for i, si in s.items()}


def firing_rates(
    model: Any, states: Any, *, dt: float | int | None = None, per_neuron: bool = False
) -> Spikes:
    """The firing rate of each spiking layer, in Hz, over a sequence of states.

    The rate is the mean number of spikes per step divided by the step `dt` (ms): over every
    step, sample and neuron of the layer, or per neuron with `per_neuron=True`.

    ```python
    _, (states, ys) = jax.lax.scan(body, state0, xs)   # states stacked over time (and batch)
    eqtrace.nn.firing_rates(net, states)              # {0: Array(12.5)}: layer 0 fires at 12.5 Hz
    ```

    **Arguments:**

    - `model`: a spiking cell, or an [`eqtrace.nn.Sequential`][] holding one or more.
    - `states`: the model's states with a leading time axis in front of every leaf, and
      optionally more leading axes (a batch axis): `(T, ...)` or `(T, B, ...)`.
    - `dt`: the time step in ms. By default each spiking cell's own `dt`.
    - `per_neuron`: whether to give one rate per neuron (averaged over the leading axes)
      rather than one per layer.

    **Returns:** for a cell, its rate, a scalar (or of shape `(hidden,)` per neuron). For a
    network, a dict from the index of each spiking layer in `model.layers` to its rate, as
    [`eqtrace.nn.spikes`][] gives the spikes.

    Raises a `TypeError` if `model` has no spiking layer, and a `ValueError` if `states` has no
    leading time axis or is not laid out as its state.
    """
    owner = "eqtrace.nn.firing_rates"
    if dt is not None and not (isinstance(dt, int | float) and dt > 0):
        raise ValueError(
            f"{owner}: `dt` must be a positive time step in ms (or None for each cell's own "
            f"`dt`), but received {dt!r}."
        )
    s, leading = _spikes(owner, "states", model, states)
    if leading == 0:
        raise ValueError(
            f"{owner}: `states` must be stacked over time (a leading time axis in front of "
            "every leaf), but received the state of a single step. Collect the states of "
            "every step, e.g. as an output of the `jax.lax.scan` body, and pass them stacked."
        )
    axes = tuple(range(leading)) if per_neuron else None
    return rates_from_spikes(model, s, None if dt is None else float(dt), axes)
