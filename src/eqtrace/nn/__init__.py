"""Cells, synaptic ops, read-outs and surrogate spike functions."""

from .._sequential import Sequential as Sequential
from . import surrogate as surrogate
from ._delay import DelayLine as DelayLine
from ._einsum import EinsumLinear as EinsumLinear
from ._feedback import RandomFeedback as RandomFeedback
from ._grouped import GroupedLinear as GroupedLinear
from ._legendre import LegendreMemory as LegendreMemory
from ._linear import Linear as Linear
from ._lowrank import LowRankLinear as LowRankLinear
from ._lru import LRUCell as LRUCell
from ._lstm import LSTMCell as LSTMCell
from ._mingru import MinGRUCell as MinGRUCell
from ._readout import LeakyReadout as LeakyReadout
from ._rnn import GRUCell as GRUCell, RNNCell as RNNCell
from ._spikes import firing_rates as firing_rates, spikes as spikes
from ._spiking import ALIF as ALIF, LIF as LIF, AbstractSpikingCell as AbstractSpikingCell
