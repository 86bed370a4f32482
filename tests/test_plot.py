"""`eqtrace.plot`: what each figure draws (the raster's points are the spikes, the traces are
the potentials), drawing on given axes, the errors, and `eqtrace` without matplotlib."""

import subprocess
import sys

import numpy as np
import pytest


matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import eqtrace  # noqa: E402
from eqtrace import plot  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_raster_points_are_the_spikes():
    spikes = np.zeros((6, 3))
    spikes[[0, 2, 5], [1, 0, 2]] = 1.0
    fig = plot.raster(spikes, dt=0.5)
    (ax,) = fig.axes
    (points,) = ax.collections
    np.testing.assert_array_equal(points.get_offsets(), [[0.0, 1], [1.0, 0], [2.5, 2]])
    assert ax.get_xlim() == (0.0, 3.0) and ax.get_ylim() == (-0.5, 2.5)
    assert ax.get_xlabel() == "time (ms)" and ax.get_ylabel() == "neuron"


def test_raster_of_one_neuron_on_given_axes():
    fig, (left, right) = plt.subplots(1, 2)
    assert plot.raster(np.array([0, 1, 1, 0]), ax=right) is fig
    assert not left.collections
    np.testing.assert_array_equal(right.collections[0].get_offsets(), [[1, 0], [2, 0]])


def test_raster_of_a_network():
    # The layers of `eqtrace.nn.spikes` one above the other: layer 3's neurons after layer 0's.
    layer0, layer3 = np.zeros((4, 2)), np.zeros((4, 3))
    layer0[1, 1] = layer3[[0, 3], [0, 2]] = 1.0
    fig = plot.raster({0: layer0, 3: layer3})
    ax = fig.axes[0]
    first, second = ax.collections
    np.testing.assert_array_equal(first.get_offsets(), [[1, 1]])
    np.testing.assert_array_equal(second.get_offsets(), [[0, 2], [3, 4]])
    assert ax.get_ylim() == (-0.5, 4.5)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 0", "layer 3"]


def test_raster_errors():
    with pytest.raises(ValueError, match=r"shape \(4, 2, 3\).*spikes\[:, 0\]"):
        plot.raster(np.zeros((4, 2, 3)))
    with pytest.raises(ValueError, match=r"same steps, but their lengths are \{0: 4, 1: 5\}"):
        plot.raster({0: np.zeros((4, 3)), 1: np.zeros((5, 3))})
    with pytest.raises(TypeError, match=r"`spikes\[1\]` must be an array"):
        plot.raster({0: np.zeros((4, 3)), 1: {0: np.zeros((4, 3))}})


def test_membrane_traces_and_fixed_threshold():
    v = np.arange(12.0).reshape(4, 3)
    fig = plot.membrane(v, threshold=1.5, neurons=[2, 0], dt=2.0)
    (ax,) = fig.axes
    traces, line = ax.lines[:2], ax.lines[2]
    for trace, i in zip(traces, [2, 0]):
        np.testing.assert_array_equal(trace.get_xdata(), [0, 2, 4, 6])
        np.testing.assert_array_equal(trace.get_ydata(), v[:, i])
        assert trace.get_label() == f"neuron {i}"
    np.testing.assert_array_equal(line.get_ydata(), [1.5, 1.5])
    assert len(ax.lines) == 3


def test_membrane_with_adaptive_threshold():
    v = np.random.default_rng(0).normal(size=(5, 2))
    threshold = 1.0 + np.arange(10.0).reshape(5, 2) / 10
    fig = plot.membrane(v, threshold=threshold)
    ax = fig.axes[0]
    assert len(ax.lines) == 4  # two traces, then a threshold per neuron in its colour
    for i in range(2):
        trace, bound = ax.lines[i], ax.lines[2 + i]
        np.testing.assert_array_equal(bound.get_ydata(), threshold[:, i])
        assert bound.get_color() == trace.get_color() and bound.get_linestyle() == "--"
    # A threshold over time shared by every neuron, `(T,)`.
    fig = plot.membrane(v, threshold=threshold[:, 0])
    np.testing.assert_array_equal(fig.axes[0].lines[3].get_ydata(), threshold[:, 0])


def test_membrane_errors():
    with pytest.raises(ValueError, match=r"shape `\(T,\)` or `\(T, n_neurons\)` of `v`"):
        plot.membrane(np.zeros((5, 2)), threshold=np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"indices in \[0, 2\), but received \[2\]"):
        plot.membrane(np.zeros((5, 2)), neurons=[0, 2])


def test_learning_curves():
    losses = [3.0, 2.0, 1.5]
    fig = plot.learning_curves(
        {"D-RTRL": losses, "BPTT": ([10, 20], [0.5, 0.25])}, ylabel="loss", logy=True
    )
    (ax,) = fig.axes
    first, second = ax.lines
    np.testing.assert_array_equal(first.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(first.get_ydata(), losses)
    np.testing.assert_array_equal(second.get_xdata(), [10, 20])
    np.testing.assert_array_equal(second.get_ydata(), [0.5, 0.25])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["D-RTRL", "BPTT"]
    assert ax.get_yscale() == "log"
    # One curve alone: no legend.
    fig = plot.learning_curves(np.array([1.0, 0.5]))
    assert fig.axes[0].get_legend() is None and len(fig.axes[0].lines) == 1
    with pytest.raises(ValueError, match="the curve 'x' must be a 1-D sequence"):
        plot.learning_curves({"x": np.zeros((2, 2))})


def test_eqtrace_without_matplotlib():
    # `import eqtrace` works without matplotlib, and a plot says how to install it.
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None\n"
        "import eqtrace\n"
        "try:\n"
        "    eqtrace.plot.raster([[1.0]])\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert 'pip install "eqtrace[plot]"' in out.stdout
    assert "eqtrace.plot.raster draws with matplotlib" in out.stdout


def test_plot_is_a_namespace_of_eqtrace():
    assert eqtrace.plot.raster is plot.raster
