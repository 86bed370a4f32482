"""Plots of spiking networks and of training: spike rasters, membrane traces, learning curves.

They need matplotlib (`pip install "eqtrace[plot]"`), which is imported when a function is
called, not with `eqtrace`. Each function draws on the matplotlib axes `ax` if given, or on a
new figure otherwise, and returns the figure.
"""

from ._plot import (
    learning_curves as learning_curves,
    membrane as membrane,
    raster as raster,
)
