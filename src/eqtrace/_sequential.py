from collections.abc import Callable, Sequence
from typing import Any

from ._cell import AbstractCell
from ._custom_types import Input


class Sequential(AbstractCell):
    """A network: cells (with state) and stateless layers (encoders, readouts), applied in order.

    Stateless layers are any callable `eqx.Module` (such as `eqx.nn.Linear`) or function of one
    argument. The state is a tuple with one entry per layer (`None` for stateless layers).
    Calling the network runs one time step: `net(state, x) -> (new_state, y)`.

    Online rules treat stateless layers exactly (ordinary backpropagation within the step) and
    cells through their eligibility traces; `eqtrace.RTRL` treats the whole network as one
    recurrent system, so it stays exact across layers.

    **Arguments:**

    - `layers`: the cells and stateless layers, input first.
    """

    layers: tuple[Any, ...]

    def __init__(self, layers: Sequence[AbstractCell | Callable]):
        self.layers = tuple(layers)

    def __check_init__(self):
        if not any(isinstance(layer, AbstractCell) for layer in self.layers):
            raise ValueError(
                "Sequential: `layers` holds no recurrent cell (no `AbstractCell`); a network "
                "without state needs no online rule. Add a cell such as `eqtrace.nn.GRUCell`."
            )

    @property
    def last_cell_index(self) -> int:
        return max(i for i, layer in enumerate(self.layers) if isinstance(layer, AbstractCell))

    def init_state(self) -> tuple[Any, ...]:
        return tuple(
            layer.init_state() if isinstance(layer, AbstractCell) else None for layer in self.layers
        )

    def __call__(self, state: tuple[Any, ...], x: Input) -> tuple[tuple[Any, ...], Any]:
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            if isinstance(layer, AbstractCell):
                layer_state, x = layer(layer_state, x)
            else:
                x = layer(x)
            new_state.append(layer_state)
        return tuple(new_state), x

    def output(self, state: tuple[Any, ...]) -> Any:
        """The last cell's output passed through the stateless layers that follow it."""
        last = self.last_cell_index
        y = self.layers[last].output(state[last])
        for layer in self.layers[last + 1 :]:
            y = layer(y)
        return y

    @property
    def core(self) -> "Sequential":
        """The layers up to the last cell: everything the state transition depends on."""
        return Sequential(self.layers[: self.last_cell_index + 1])
