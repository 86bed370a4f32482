"""Cells, synaptic ops, read-outs and surrogate spike functions."""

from ._linear import Linear as Linear
from ._rnn import GRUCell as GRUCell, RNNCell as RNNCell
from ._sequential import Sequential as Sequential
