"""The plots of `eqtrace.plot`; matplotlib is imported by each function, when called."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import ArrayLike


def _pyplot(owner: str) -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            f"{owner} draws with matplotlib, which is not installed. Install it with "
            '`pip install "eqtrace[plot]"` (or `pip install matplotlib`).'
        ) from error
    return plt


def _figure_and_axes(owner: str, ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is None:
        return _pyplot(owner).subplots(figsize=figsize)
    return ax.get_figure(), ax


def _one_sequence(owner: str, name: str, value: Any, fix: str) -> np.ndarray:
    """`value` as a `(T, n)` NumPy array (a `(T,)` one as a single column)."""
    array = np.asarray(value)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(
            f"{owner}: `{name}` must be one sequence, of shape `(T, n_neurons)` (or `(T,)`), "
            f"but received shape {array.shape}. {fix}"
        )
    return array


def _neurons(owner: str, neurons: Sequence[int] | None, n: int) -> list[int]:
    if neurons is None:
        return list(range(n))
    chosen = [int(i) for i in neurons]
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ValueError(
            f"{owner}: `neurons` must be indices in [0, {n}), but received {bad} among them."
        )
    return chosen


def _select_one(name: str) -> str:
    return f"If it holds a batch, select one sample, e.g. `{name}[:, 0]` of a `(T, B, n)`."


def raster(
    spikes: ArrayLike | Sequence[Any] | Mapping[int, Any],
    *,
    dt: float | int = 1.0,
    ax: Any = None,
    color: str = "black",
    size: float | int = 30.0,
) -> Any:
    """A spike raster: a tick at `(time, neuron)` for each spike of one sequence.

    ```python
    s = eqtrace.nn.spikes(net, states)  # {0: (T, hidden)}: one sample's states over time
    fig = eqtrace.plot.raster(s)       # or raster(s[0]) for layer 0 alone
    ```

    **Arguments:**

    - `spikes`: the spikes of one sequence, `(T, n_neurons)` (or `(T,)` for one neuron);
      every non-zero entry is a spike. Or the spikes of a network as
      [`eqtrace.nn.spikes`][] gives them, a dict from layer index to each layer's
      `(T, n_neurons)`: the layers are drawn one above the other, the first at the bottom.
    - `dt`: the time step in ms: step `t` is drawn at `t × dt`.
    - `ax`: the matplotlib axes to draw on; by default a new figure.
    - `color`, `size`: the colour and size (in points², as in `ax.scatter`) of the ticks.

    **Returns:** the matplotlib `Figure` drawn on. Each layer's spikes are one scatter
    collection of `ax`, its offsets the `(t × dt, neuron)` of each spike (neurons of a later
    layer numbered after those of the layers below it).
    """
    owner = "eqtrace.plot.raster"
    network = isinstance(spikes, Mapping)
    layers = list(spikes.items()) if isinstance(spikes, Mapping) else [(None, spikes)]
    arrays = []
    for index, value in layers:
        name = "spikes" if index is None else f"spikes[{index!r}]"
        if isinstance(value, Mapping):
            raise TypeError(
                f"{owner}: `{name}` must be an array, but received a dict: the spikes of a "
                f"network nested as a layer. Pass them on their own, `raster({name})`."
            )
        arrays.append(_one_sequence(owner, name, value, _select_one(name)))
    if len({a.shape[0] for a in arrays}) > 1:
        lengths = {index: a.shape[0] for (index, _), a in zip(layers, arrays)}
        raise ValueError(
            f"{owner}: the layers of `spikes` must cover the same steps, but their lengths "
            f"are {lengths}."
        )
    fig, ax = _figure_and_axes(owner, ax, (6.0, 3.0))
    base, ticks = 0, []
    for (index, _), array in zip(layers, arrays):
        steps, neurons = np.nonzero(array)
        ax.scatter(steps * dt, neurons + base, marker="|", s=size, c=color, linewidths=1.0)
        if base:
            ax.axhline(base - 0.5, color="grey", lw=0.5)
        ticks.append((base + (array.shape[1] - 1) / 2, f"layer {index}"))
        base += array.shape[1]
    length = arrays[0].shape[0] if arrays else 0
    ax.set_xlim(0.0, length * dt)
    ax.set_ylim(-0.5, base - 0.5)
    ax.set_xlabel("time (ms)")
    if network:
        ax.set_yticks([y for y, _ in ticks], [label for _, label in ticks])
    ax.set_ylabel("neuron")
    return fig


def membrane(
    v: ArrayLike | Sequence[Any],
    *,
    threshold: float | ArrayLike | Sequence[Any] | None = None,
    neurons: Sequence[int] | None = None,
    dt: float | int = 1.0,
    ax: Any = None,
) -> Any:
    """Membrane potentials over time, one line per neuron, with the firing threshold.

    ```python
    v = states[0][0]  # ALIF layer 0 over time: its state is (v, a, s); v is (T, hidden)
    A = jax.vmap(net.layers[0].adaptive_threshold)(states[0])  # its threshold over time
    fig = eqtrace.plot.membrane(v, threshold=A, neurons=[0, 1, 2])
    ```

    **Arguments:**

    - `v`: the membrane potentials of one sequence, `(T, n_neurons)` (or `(T,)`).
    - `threshold`: optional; a number (one dashed horizontal line, e.g. the `threshold` of an
      `eqtrace.nn.LIF`), or an array of shape `(T,)` or `(T, n_neurons)` for a threshold that
      changes over time (the adaptive threshold of an `eqtrace.nn.ALIF`), drawn dashed in the
      colour of each neuron's trace.
    - `neurons`: the indices of the neurons to draw (default: all).
    - `dt`: the time step in ms: step `t` is drawn at `t × dt`.
    - `ax`: the matplotlib axes to draw on; by default a new figure.

    **Returns:** the matplotlib `Figure` drawn on. Its axes hold one line per neuron (in the
    order of `neurons`), then the threshold line(s).
    """
    owner = "eqtrace.plot.membrane"
    array = _one_sequence(owner, "v", v, _select_one("v"))
    length, n = array.shape
    chosen = _neurons(owner, neurons, n)
    thresholds = None
    if threshold is not None and np.ndim(threshold) > 0:
        thresholds = np.asarray(threshold)
        if thresholds.ndim == 1:
            thresholds = np.broadcast_to(thresholds[:, None], (thresholds.shape[0], n))
        if thresholds.shape != array.shape:
            raise ValueError(
                f"{owner}: an array `threshold` must have the shape `(T,)` or `(T, n_neurons)` "
                f"of `v`, {array.shape}, but received shape {np.shape(threshold)}. Pass a "
                "number for a fixed threshold."
            )
    fig, ax = _figure_and_axes(owner, ax, (6.0, 3.0))
    time = np.arange(length) * dt
    lines = [ax.plot(time, array[:, i], lw=1.0, label=f"neuron {i}")[0] for i in chosen]
    if thresholds is not None:
        for i, line in zip(chosen, lines):
            ax.plot(time, thresholds[:, i], ls="--", lw=0.8, color=line.get_color())
    elif threshold is not None:
        ax.axhline(float(threshold), ls="--", lw=0.8, color="grey", label="threshold")
    ax.set_xlim(0.0, length * dt)  # as `raster`, so that the two line up
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("membrane potential")
    if len(chosen) <= 10:
        ax.legend(fontsize="small")
    return fig


def _curve(owner: str, label: str, value: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(value, tuple) and len(value) == 2 and all(np.ndim(v) == 1 for v in value):
        x, y = (np.asarray(v) for v in value)
    else:
        y = np.asarray(value)
        x = np.arange(1, y.shape[0] + 1) if y.ndim == 1 else None
    if y.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"{owner}: the curve {label!r} must be a 1-D sequence of values, or a pair `(x, y)` "
            f"of 1-D sequences of the same length, but received shape {np.shape(value)}."
        )
    return x, y


def learning_curves(
    curves: Mapping[str, Any] | ArrayLike | Sequence[Any],
    *,
    xlabel: str = "update",
    ylabel: str = "loss",
    logy: bool = False,
    ax: Any = None,
) -> Any:
    """Learning curves: one line per run (a loss or an accuracy over the updates).

    ```python
    fig = eqtrace.plot.learning_curves({"D-RTRL": losses, "BPTT": bptt_losses})
    eqtrace.plot.learning_curves(
        {"D-RTRL": (eval_updates, accuracies)}, ylabel="test accuracy", ax=axes[1]
    )
    ```

    **Arguments:**

    - `curves`: a dict from each curve's label to its values, or one curve alone. A curve is
      a 1-D sequence of values (drawn at `x = 1, 2, …`), or a pair `(x, y)` of 1-D sequences
      of the same length (values at given updates, such as test evaluations).
    - `xlabel`, `ylabel`: the axis labels.
    - `logy`: whether the y axis is logarithmic.
    - `ax`: the matplotlib axes to draw on; by default a new figure.

    **Returns:** the matplotlib `Figure` drawn on, with one line per curve in the order given
    (and a legend if they are labelled).
    """
    owner = "eqtrace.plot.learning_curves"
    labelled = isinstance(curves, Mapping)
    items = list(curves.items()) if isinstance(curves, Mapping) else [("", curves)]
    data = [(label, *_curve(owner, label, value)) for label, value in items]
    fig, ax = _figure_and_axes(owner, ax, (5.0, 3.0))
    for label, x, y in data:
        ax.plot(x, y, lw=1.0, label=label if labelled else None)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if labelled and data:
        ax.legend(fontsize="small")
    return fig
